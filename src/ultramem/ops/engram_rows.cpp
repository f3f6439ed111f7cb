#include "ultramem/ops/engram_rows.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>
#include <random>
#include <stdexcept>
#include <string>

namespace ultramem::ops {

int64_t next_prime(int64_t n) {
  auto prime = [](int64_t v) {
    if (v < 2) return false;
    for (int64_t d = 2; d * d <= v; ++d)
      if (v % d == 0) return false;
    return true;
  };
  int64_t v = n < 2 ? 2 : n;
  while (!prime(v)) ++v;
  return v;
}

EngramHash engram_hash(int64_t heads, int64_t rows, uint64_t seed) {
  if (heads < 1) throw std::invalid_argument("engram: heads must be >= 1, got " + std::to_string(heads));
  if (rows < 1) throw std::invalid_argument("engram: rows must be >= 1, got " + std::to_string(rows));
  EngramHash h;
  h.heads = heads;
  std::mt19937_64 rng(seed ^ 0x5851f42d4c957f2dULL);
  int64_t want = rows, total = 0;
  for (int64_t j = 0; j < h.tables(); ++j) {
    h.sizes.push_back(next_prime(want));
    want = h.sizes.back() + 1;
    h.offsets.push_back(total);
    total += h.sizes.back();
    h.salt.push_back(rng());
    h.mul.push_back(rng() | 1);
  }
  return h;
}

void engram_rows(const EngramHash& hash, const int64_t* seq, int64_t B, int64_t T, int64_t* out) {
  const int64_t J = hash.tables();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t* end = seq + b * (T + 2) + t + 3;  // one past the current id (seq[b, t + 2])
      for (int64_t j = 0; j < J; ++j) {
        const int64_t n = j < hash.heads ? 2 : 3;       // tables 0..heads-1: 2-grams, then 3-grams
        uint64_t h = hash.salt[size_t(j)];
        for (int64_t i = n; i >= 1; --i) h = (h ^ uint64_t(end[-i] + 1)) * hash.mul[size_t(j)];
        h ^= h >> 29;
        out[(b * T + t) * J + j] = hash.offsets[size_t(j)] + int64_t(h % uint64_t(hash.sizes[size_t(j)]));
      }
    }
}

at::Tensor engram_rows(const EngramHash& hash, const at::Tensor& tokens, const at::Tensor& history) {
  TORCH_CHECK(tokens.dim() == 2 && tokens.scalar_type() == at::kLong, "engram_rows: tokens must be [B, T] int64, got ",
              tokens.scalar_type(), " ", tokens.sizes());
  const int64_t B = tokens.size(0), T = tokens.size(1);
  at::Tensor hist;
  if (history.defined()) {
    TORCH_CHECK(history.scalar_type() == at::kLong && history.dim() == 2 && history.size(0) == B && history.size(1) == 2,
                "engram_rows: the history must be [B=", B, ", 2] int64, got ", history.scalar_type(), " ",
                history.sizes());
    hist = history.contiguous();
  } else {
    hist = at::full({B, 2}, -1, at::kLong);
  }
  const at::Tensor seq = at::cat({hist, tokens.contiguous()}, 1).contiguous();  // [B, T + 2]
  at::Tensor out = at::empty({B, T, hash.tables()}, at::kLong);
  engram_rows(hash, seq.data_ptr<int64_t>(), B, T, out.data_ptr<int64_t>());
  return out;
}

namespace {

// The hash of (heads, rows, seed), built once: the op is called on every forward of a Python layer.
const EngramHash& cached_hash(int64_t heads, int64_t rows, uint64_t seed) {
  static std::mutex mu;
  static std::map<std::tuple<int64_t, int64_t, uint64_t>, EngramHash> cache;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(heads, rows, seed);
  auto it = cache.find(key);
  if (it == cache.end()) {
    if (cache.size() >= 64) cache.clear();  // a bound; references handed out earlier are used under no lock
    it = cache.emplace(key, engram_hash(heads, rows, seed)).first;
  }
  return it->second;
}

}  // namespace

at::Tensor engram_rows_op(const at::Tensor& tokens, const c10::optional<at::Tensor>& history, int64_t heads,
                          int64_t rows, int64_t seed) {
  TORCH_CHECK(rows >= 1 && heads >= 1, "engram_rows: heads and rows must be >= 1, got ", heads, " and ", rows);
  const EngramHash hash = cached_hash(heads, rows, static_cast<uint64_t>(seed));  // a copy: the cache may be cleared
  return engram_rows(hash, tokens, history.has_value() ? *history : at::Tensor());
}

void engram_prefetch_rows(const void* table, int64_t row_bytes, const float* scale, const int64_t* rows,
                          int64_t count, int64_t max_bytes) {
  const char* base = static_cast<const char*>(table);
  int64_t requested = 0;
  for (int64_t i = 0; i < count && requested < max_bytes; ++i, requested += row_bytes) {
    const char* row = base + rows[i] * row_bytes;
    for (int64_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(row + off, 0, 1);
    if (scale) __builtin_prefetch(scale + rows[i], 0, 1);
  }
}

at::Tensor engram_table_sizes_op(int64_t heads, int64_t rows) {
  const EngramHash hash = engram_hash(heads, rows, 0);
  at::Tensor out = at::empty({hash.tables()}, at::kLong);
  std::copy(hash.sizes.begin(), hash.sizes.end(), out.data_ptr<int64_t>());
  return out;
}

}  // namespace ultramem::ops
