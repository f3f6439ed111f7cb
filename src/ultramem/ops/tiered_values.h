// A memory layer's value table in a file (kernels' value-table file: int8 rows with their scale, or bf16)
// behind a bounded row cache, for tables larger than memory. The decode op (ultramem_decode.h) reads it in
// place of a values tensor: a retrieval submits the reads of the rows it needs as soon as it knows them,
// and the lookup waits for them, so for a memory placed i:j the reads run while blocks i..j compute.
// The IVE permutation is the layer's stored one, or a keyed Feistel bijection that takes no memory.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace ultramem::kernels {
class RowCache;
}

namespace ultramem::ops {

struct TieredValuesStats {
  int64_t lookups = 0;      // rows asked for, with repeats
  int64_t hits = 0;         // of them found resident (or asked for twice in one step)
  int64_t misses = 0;       // rows read from the file
  int64_t reads = 0;        // read requests (rows within a page span merged)
  int64_t bytes_read = 0;   // bytes read from the file
  double wait_seconds = 0;  // time the lookups waited for reads still in flight
  double submit_seconds = 0;  // time the submits took (cache bookkeeping, and handing the reads to the
                              // kernel, which blocks when the device's queue is full)
};

class TieredValues {
 public:
  // path: a value-table file; cache_bytes: the cap on the cache's memory; E: the layer's IVE groups (the
  // grid has E * rows slots). feistel_key: the permutation is FeistelPermutation(E * rows, key); without it
  // the lookups take the layer's stored permutation. Throws std::runtime_error naming the file for a bad
  // table (kernels' read_table_header) and std::invalid_argument for a cache below 1024 rows. io_uring and
  // direct_io as kernels::RowCache's (pread instead of io_uring; reads that bypass the page cache).
  TieredValues(const std::string& path, int64_t cache_bytes, int64_t E, std::optional<uint64_t> feistel_key,
               bool io_uring = true, bool direct_io = true);
  ~TieredValues();
  TieredValues(const TieredValues&) = delete;
  TieredValues& operator=(const TieredValues&) = delete;

  int64_t rows() const;               // N physical rows
  int64_t dv() const;                 // Dv
  bool int8() const;                  // int8 rows (else bf16)
  int64_t E() const { return E_; }
  const std::optional<uint64_t>& feistel_key() const { return feistel_key_; }
  int64_t cache_rows() const;         // slots of the cache
  int64_t cache_memory_bytes() const; // what the cache holds allocated
  const std::string& path() const;
  bool uses_io_uring() const;
  bool uses_direct_io() const;

  // index: [T, K] int64 grid addresses in [0, E*N); perm: [E*N] int64 (ignored with a Feistel key).
  // Resolves them to rows and starts reading those not cached; returns at once.
  void submit(const at::Tensor& index, const at::Tensor& perm);
  // The pooled lookup (kernels' pooled_lookup_forward_int8 / _bf16) of index [T, K] with scores [T, K, C]
  // into pooled [T, E*Dv] (float or double, as scores): waits for the reads of the last submit when it was
  // this index, else submits it first.
  void pool(const at::Tensor& index, const at::Tensor& perm, const at::Tensor& scores, int64_t C, void* pooled);

  TieredValuesStats stats() const;
  void reset_stats();

  // Reads the physical rows [n] into the cache, in batches of at most half its slots and 16384 rows (the
  // last ones stay resident): a hot list, to start serving with a warm cache. Rows in file order read fastest.
  void warm(const int64_t* rows, int64_t n);

  // Synthetic row traffic, for benchmarks: `traffic(rows, n)` rewrites the physical rows [n] of every submit
  // (uniform or Zipfian draws, say) before they are read, and the lookups pool the rows it chose. The
  // layer's outputs are then no longer its own. nullptr: the retrieval's rows (the default).
  using RowTraffic = std::function<void(int64_t* rows, int64_t n)>;
  void set_row_traffic(RowTraffic traffic) { traffic_ = std::move(traffic); }

 private:
  std::unique_ptr<kernels::RowCache> cache_;
  int64_t E_ = 1;
  std::optional<uint64_t> feistel_key_;
  std::vector<int64_t> index_;     // [T*K] the submitted grid addresses
  std::vector<int64_t> group_;     // [T*K] their IVE group (v / N)
  std::vector<int64_t> rows_;      // [T*K] their rows (v % N)
  std::vector<int64_t> resolved_;  // [T*K] group * cache_rows + slot, for the kernel's identity permutation
  RowTraffic traffic_;
  bool submitted_ = false;
  double wait_seconds_ = 0, submit_seconds_ = 0;
};

// The keyed Feistel bijection of [0, slots) (kernels/feistel.h) materialised: out[g] = F(g), out [slots].
void feistel_permutation(int64_t slots, uint64_t key, int64_t* out);
// "" when the stored permutation perm [slots] (int64) is the Feistel key's materialisation at `samples`
// spread positions (and has the size), else what differs.
std::string feistel_mismatch(const at::Tensor& perm, int64_t slots, uint64_t key, int64_t samples = 4096);

// Value-table files (the kernels' format) written by streaming, in memory one chunk whatever their size;
// progress(rows_done) is called along the way. std::runtime_error naming the file (a full disk leaves no
// file that looks complete).
// rows x dv values N(0, std^2) from the kernels' counter-based generator (row r depends on seed and r
// only), stored as int8 with row scales (int8) or bf16.
void write_random_value_table(const std::string& path, bool int8, int64_t rows, int64_t dv, uint64_t seed, double std,
                              const std::function<void(int64_t rows_done)>& progress = {});
// The float32 table values [rows, dv] (a layer's, memory-mapped from a checkpoint, say), quantised as the
// in-memory int8 / bf16 formats are.
void write_value_table(const std::string& path, bool int8, const at::Tensor& values,
                       const std::function<void(int64_t rows_done)>& progress = {});

}  // namespace ultramem::ops
