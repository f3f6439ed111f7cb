// Engram's addressing (spec section 12; nn/engram.h is the layer): which row of each hashed n-gram
// table a position reads. Rows depend on token ids only, so a decoder can compute them (and read the
// rows ahead) before the forward pass. Python reaches the same hash through torch.ops.ultramem.
//
//   tables j = 0 .. 2*heads-1: j < heads hash the last 2 ids, the others the last 3
//   h = salt_j; for each id of the window, oldest first: h = (h ^ (id + 1)) * mul_j   (64-bit, mul_j odd)
//   h ^= h >> 29;  row = offset_j + h mod M_j
//
// M_j are distinct primes: the smallest prime >= rows, then each the smallest prime above the previous.
// salt_j and mul_j come from std::mt19937_64 seeded with seed ^ 0x5851f42d4c957f2d, drawn in table
// order (salt, then mul). Positions before the sequence's start read id -1 (hashed as 0).
#pragma once
#include <ATen/core/Tensor.h>

#include <c10/util/Optional.h>

#include <cstdint>
#include <vector>

namespace ultramem::ops {

// The smallest prime >= n (and >= 2).
int64_t next_prime(int64_t n);

// The hash parameters of one Engram memory.
struct EngramHash {
  int64_t heads = 0;              // hash heads per n-gram order
  std::vector<int64_t> sizes;     // [2*heads] M_j, distinct primes
  std::vector<int64_t> offsets;   // [2*heads] first row of table j in the stacked table
  std::vector<uint64_t> salt;     // [2*heads]
  std::vector<uint64_t> mul;      // [2*heads] odd
  int64_t tables() const { return 2 * heads; }
  int64_t total_rows() const { return sizes.empty() ? 0 : offsets.back() + sizes.back(); }
};

// heads >= 1, rows >= 1 (std::invalid_argument otherwise).
EngramHash engram_hash(int64_t heads, int64_t rows, uint64_t seed);

// seq: [B, T + 2] ids, the two ids before the T positions first (-1 before a sequence's start);
// out: [B, T, 2*heads] rows of the stacked table.
void engram_rows(const EngramHash& hash, const int64_t* seq, int64_t B, int64_t T, int64_t* out);

// Requests into cache (nothing is computed) the table rows a forward will read: for each of the `count`
// row ids `rows` [count], its `row_bytes` at table + row * row_bytes and, when `scale` is given (int8),
// its float scale; in order, until max_bytes of rows were requested. Row ids are trusted (engram_rows').
void engram_prefetch_rows(const void* table, int64_t row_bytes, const float* scale, const int64_t* rows,
                          int64_t count, int64_t max_bytes);

// The same on tensors, checked: tokens [B, T] int64, history [B, 2] int64 (the two ids before them;
// undefined = a sequence start) -> [B, T, 2*heads] int64. c10::Error naming the bad argument.
at::Tensor engram_rows(const EngramHash& hash, const at::Tensor& tokens, const at::Tensor& history);

// The op: the same with the hash built from (heads, rows, seed), once per distinct triple (cached)
// -> [B, T, 2*heads] int64.
at::Tensor engram_rows_op(const at::Tensor& tokens, const c10::optional<at::Tensor>& history, int64_t heads,
                          int64_t rows, int64_t seed);

// [2*heads] int64: the tables' sizes M_j (their sum is the stacked table's row count).
at::Tensor engram_table_sizes_op(int64_t heads, int64_t rows);

}  // namespace ultramem::ops
