// A value table stored as a file of rows, for tables larger than memory (a billion slots on one machine).
// The file is written by streaming, never holding a full-size copy, and read a row at a time behind a
// bounded cache (row_cache.h).
//
// Layout: a 4096-byte header, then row r at byte data_offset + r * row_bytes:
//   int8: Dv int8 values, then the row's float32 scale (value = q * scale; value_quant.h), row_bytes = Dv + 4
//   bf16: Dv bfloat16 values, row_bytes = 2 * Dv
// Header, little-endian: "UMVALTAB", u32 version (1), u32 format (1 int8, 2 bf16), u64 rows, u64 Dv,
// u64 row_bytes, u64 data_offset (4096), u64 FNV-1a 64 of the 48 bytes before it.
#pragma once
#include <cstdint>
#include <functional>
#include <string>

namespace ultramem::kernels {

enum class TableFormat : uint32_t { kInt8 = 1, kBf16 = 2 };

struct TableFileInfo {
  TableFormat format = TableFormat::kInt8;
  int64_t rows = 0;         // N physical rows
  int64_t dv = 0;           // Dv values per row
  int64_t row_bytes = 0;    // bytes of one stored row
  int64_t data_offset = 0;  // byte offset of row 0
};

inline int64_t table_row_bytes(TableFormat f, int64_t dv) { return f == TableFormat::kInt8 ? dv + 4 : 2 * dv; }
const char* to_string(TableFormat f);  // "int8" | "bf16"

// Produces float rows [first, first + count) of the table into out [count, Dv].
using RowFill = std::function<void(int64_t first, int64_t count, float* out)>;

// Writes a rows x dv table by streaming `fill` in chunks of chunk_rows rows, each row quantised to
// `format` (int8 and bf16 exactly as value_quant.h does). The file is written as `<path>.tmp.<pid>` and
// renamed to path only when complete and flushed: a failure (a full disk, a non-finite value) removes the
// temporary and leaves nothing at path that could pass for a table. Memory: one chunk. Throws
// std::runtime_error naming the file; `progress` (optional) gets the rows written so far.
void write_table_file(const std::string& path, TableFormat format, int64_t rows, int64_t dv, const RowFill& fill,
                      int64_t chunk_rows = 8192, const std::function<void(int64_t rows_done)>& progress = {});

// Rows of independent N(0, std^2) values from a counter-based generator: row r depends only on (seed, r),
// so a table written in any chunking is the same. out: [count, dv].
void gaussian_rows(uint64_t seed, float std, int64_t first, int64_t count, int64_t dv, float* out);

// Reads and checks the header of a table file: std::runtime_error naming the file when it is missing,
// not a table (magic, version, format, header hash), or not exactly data_offset + rows * row_bytes long
// (truncated or padded).
TableFileInfo read_table_header(const std::string& path);

}  // namespace ultramem::kernels
