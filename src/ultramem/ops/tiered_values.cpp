#include "ultramem/ops/tiered_values.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <chrono>
#include <cstring>

#include "ultramem/kernels/feistel.h"
#include "ultramem/kernels/pooled_lookup.h"
#include "ultramem/kernels/row_cache.h"
#include "ultramem/kernels/value_table_file.h"

namespace ultramem::ops {

TieredValues::TieredValues(const std::string& path, int64_t cache_bytes, int64_t E,
                           std::optional<uint64_t> feistel_key, bool io_uring, bool direct_io)
    : cache_(std::make_unique<kernels::RowCache>(path, cache_bytes, io_uring, direct_io)), E_(E), feistel_key_(feistel_key) {
  TORCH_CHECK(E >= 1, "TieredValues: E must be >= 1, got ", E);
}

TieredValues::~TieredValues() = default;

int64_t TieredValues::rows() const { return cache_->info().rows; }
int64_t TieredValues::dv() const { return cache_->info().dv; }
bool TieredValues::int8() const { return cache_->info().format == kernels::TableFormat::kInt8; }
int64_t TieredValues::cache_rows() const { return cache_->capacity_rows(); }
int64_t TieredValues::cache_memory_bytes() const { return cache_->memory_bytes(); }
const std::string& TieredValues::path() const { return cache_->path(); }
bool TieredValues::uses_io_uring() const { return cache_->uses_io_uring(); }
bool TieredValues::uses_direct_io() const { return cache_->uses_direct_io(); }

void TieredValues::submit(const at::Tensor& index, const at::Tensor& perm) {
  TORCH_CHECK(index.defined() && index.scalar_type() == at::kLong && index.is_contiguous() && index.dim() == 2,
              "TieredValues: index must be a contiguous int64 [T, K] tensor");
  const int64_t hits = index.numel(), N = rows(), slots = E_ * N;
  const int64_t* g = index.data_ptr<int64_t>();
  const int64_t* p = nullptr;
  std::optional<kernels::FeistelPermutation> feistel;
  if (feistel_key_) {
    feistel.emplace(uint64_t(slots), *feistel_key_);
  } else {
    TORCH_CHECK(perm.defined() && perm.scalar_type() == at::kLong && perm.is_contiguous() && perm.numel() == slots,
                "TieredValues: the stored permutation must be a contiguous int64 [", slots, "] tensor");
    p = perm.data_ptr<int64_t>();
  }
  index_.assign(g, g + hits);
  group_.resize(size_t(hits));
  rows_.resize(size_t(hits));
  for (int64_t e = 0; e < hits; ++e) {
    TORCH_CHECK(g[e] >= 0 && g[e] < slots, "TieredValues: index entry ", g[e], " is outside [0, ", slots, ")");
    const int64_t v = feistel ? int64_t(feistel->forward(uint64_t(g[e]))) : p[g[e]];
    group_[size_t(e)] = v / N;
    rows_[size_t(e)] = v - group_[size_t(e)] * N;
  }
  if (traffic_) {
    traffic_(rows_.data(), hits);
    for (int64_t e = 0; e < hits; ++e)
      TORCH_CHECK(rows_[size_t(e)] >= 0 && rows_[size_t(e)] < N, "TieredValues: the row traffic chose row ",
                  rows_[size_t(e)], ", outside [0, ", N, ")");
  }
  const auto start = std::chrono::steady_clock::now();
  cache_->submit(rows_.data(), hits);
  submit_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  submitted_ = true;
}

void TieredValues::pool(const at::Tensor& index, const at::Tensor& perm, const at::Tensor& scores, int64_t C,
                        void* pooled) {
  const int64_t T = index.size(0), K = index.size(1), hits = T * K;
  const bool same = submitted_ && int64_t(index_.size()) == hits &&
                    std::memcmp(index_.data(), index.data_ptr<int64_t>(), size_t(hits) * sizeof(int64_t)) == 0;
  if (!same) submit(index, perm);
  resolved_.resize(size_t(hits));
  const auto start = std::chrono::steady_clock::now();
  cache_->complete(resolved_.data());  // slots, in submit order
  wait_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  submitted_ = false;
  const int64_t cap = cache_rows();
  for (int64_t e = 0; e < hits; ++e) resolved_[size_t(e)] += group_[size_t(e)] * cap;

  kernels::PoolShape ps;
  ps.T = T;
  ps.K = K;
  ps.N = cap;
  ps.Dv = dv();
  ps.E = E_;
  ps.C = C;
  auto run = [&](auto* out, const auto* s) {
    using S = std::remove_const_t<std::remove_pointer_t<decltype(s)>>;
    if (int8())
      kernels::pooled_lookup_forward_int8<S>(ps, cache_->int8_values(), cache_->int8_scales(), resolved_.data(), s,
                                             nullptr, out);
    else
      kernels::pooled_lookup_forward_bf16<S>(ps, cache_->bf16_values(), resolved_.data(), s, nullptr, out);
  };
  if (scores.scalar_type() == at::kFloat)
    run(static_cast<float*>(pooled), scores.data_ptr<float>());
  else
    run(static_cast<double*>(pooled), scores.data_ptr<double>());
}

void TieredValues::warm(const int64_t* rows, int64_t n) {
  TORCH_CHECK(n >= 0, "TieredValues::warm: n must be >= 0");
  // At most half the slots, and few enough rows that one batch's reads (whole pages) stay tens of MB.
  const int64_t batch = std::max<int64_t>(1, std::min<int64_t>(cache_rows() / 2, 16384));
  std::vector<int64_t> slots(size_t(std::min(n, batch)));
  for (int64_t first = 0; first < n; first += batch) {
    const int64_t count = std::min(batch, n - first);
    cache_->fetch(rows + first, count, slots.data());
  }
  submitted_ = false;
}

void feistel_permutation(int64_t slots, uint64_t key, int64_t* out) {
  TORCH_CHECK(slots >= 1, "feistel_permutation: slots must be >= 1");
  const kernels::FeistelPermutation f(uint64_t(slots), key);
  at::parallel_for(0, slots, 1 << 16, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) out[g] = int64_t(f.forward(uint64_t(g)));
  });
}

std::string feistel_mismatch(const at::Tensor& perm, int64_t slots, uint64_t key, int64_t samples) {
  if (!perm.defined() || perm.scalar_type() != at::kLong || !perm.is_contiguous() || perm.numel() != slots)
    return "the stored permutation has " + std::to_string(perm.defined() ? perm.numel() : 0) + " entries, not " +
           std::to_string(slots);
  const kernels::FeistelPermutation f(uint64_t(slots), key);
  const int64_t* p = perm.data_ptr<int64_t>();
  const int64_t step = std::max<int64_t>(1, slots / std::max<int64_t>(1, samples));
  for (int64_t g = 0; g < slots; g += step)
    if (p[g] != int64_t(f.forward(uint64_t(g))))
      return "perm[" + std::to_string(g) + "] = " + std::to_string(p[g]) + " but the Feistel key " + std::to_string(key) +
             " maps it to " + std::to_string(f.forward(uint64_t(g)));
  return "";
}

void write_random_value_table(const std::string& path, bool int8, int64_t rows, int64_t dv, uint64_t seed, double std,
                              const std::function<void(int64_t)>& progress) {
  kernels::write_table_file(
      path, int8 ? kernels::TableFormat::kInt8 : kernels::TableFormat::kBf16, rows, dv,
      [&](int64_t first, int64_t count, float* out) { kernels::gaussian_rows(seed, float(std), first, count, dv, out); },
      8192, progress);
}

void write_value_table(const std::string& path, bool int8, const at::Tensor& values,
                       const std::function<void(int64_t)>& progress) {
  TORCH_CHECK(values.defined() && values.dim() == 2 && values.scalar_type() == at::kFloat && values.is_contiguous(),
              "write_value_table: values must be a contiguous float32 [rows, dv] tensor");
  const int64_t dv = values.size(1);
  const float* v = values.data_ptr<float>();
  kernels::write_table_file(
      path, int8 ? kernels::TableFormat::kInt8 : kernels::TableFormat::kBf16, values.size(0), dv,
      [&](int64_t first, int64_t count, float* out) {
        std::memcpy(out, v + first * dv, size_t(count * dv) * sizeof(float));
      },
      8192, progress);
}

TieredValuesStats TieredValues::stats() const {
  const auto s = cache_->stats();
  return TieredValuesStats{s.lookups, s.hits, s.misses, s.reads, s.bytes_read, wait_seconds_, submit_seconds_};
}

void TieredValues::reset_stats() {
  cache_->reset_stats();
  wait_seconds_ = submit_seconds_ = 0;
}

}  // namespace ultramem::ops
