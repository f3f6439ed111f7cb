// Pooled value lookup kernels (IVE + MCS). Compiled once per ISA (UM_ISA = generic | avx2); shape
// checks, hit grouping and scalar references are compiled in the generic build only.
#include "ultramem/kernels/pooled_lookup.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "ultramem/kernels/kernel_table.h"
#include "ultramem/kernels/simd.h"
#include "ultramem/kernels/value_quant.h"

#include <omp.h>

namespace ultramem::kernels {
namespace UM_ISA {
namespace {

constexpr int64_t kPrefetchAhead = 4;  // hits ahead whose value rows are prefetched

// One token's hits resolved through the permutation before any value row is touched: the K random
// perm loads are independent and overlap, and the row prefetches below no longer wait on them.
struct Hits {
  std::vector<int64_t> row;    // [K] physical value row
  std::vector<int64_t> group;  // [K] IVE group
  void resolve(const int64_t* idx, const int64_t* perm, int64_t K, int64_t N) {
    row.resize(K);
    group.resize(K);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t v = perm[idx[k]];
      group[k] = v / N;
      row[k] = v - group[k] * N;
    }
  }
  template <typename T>
  void prefetch(const T* values, int64_t k, int64_t Dv) const {
    if (k < static_cast<int64_t>(row.size()))
      simd::prefetch_bytes(values + row[k] * Dv, Dv * static_cast<int64_t>(sizeof(T)));
  }
};

// How a stored value row is read. Each adds `w` times slice [off, off + n) of row `row` to dst.
template <typename T>
struct PlainRows {  // float / double, as trained
  const T* v;
  int64_t Dv;
  int64_t row_bytes() const { return Dv * int64_t(sizeof(T)); }
  void prefetch(int64_t row) const { simd::prefetch_bytes(v + row * Dv, row_bytes()); }
  T row_weight(int64_t /*row*/, T w) const { return w; }
  void axpy(T* dst, T w, int64_t row, int64_t off, int64_t n) const { simd::axpy(dst, w, v + row * Dv + off, n); }
};
template <typename T>
struct Bf16Rows {  // bf16 bits, widened exactly
  const uint16_t* v;
  int64_t Dv;
  int64_t row_bytes() const { return Dv * 2; }
  void prefetch(int64_t row) const { simd::prefetch_bytes(v + row * Dv, row_bytes()); }
  T row_weight(int64_t /*row*/, T w) const { return w; }
  void axpy(T* dst, T w, int64_t row, int64_t off, int64_t n) const {
    simd::axpy_bf16(dst, w, v + row * Dv + off, n);
  }
};
template <typename T>
struct Int8Rows {  // int8 with a per-row scale, folded into the weight
  const int8_t* v;
  const float* scale;
  int64_t Dv;
  int64_t row_bytes() const { return Dv; }
  void prefetch(int64_t row) const {
    simd::prefetch_bytes(v + row * Dv, row_bytes());
    __builtin_prefetch(scale + row, 0, 1);
  }
  T row_weight(int64_t row, T w) const { return w * T(scale[row]); }
  void axpy(T* dst, T w, int64_t row, int64_t off, int64_t n) const { simd::axpy_i8(dst, w, v + row * Dv + off, n); }
};

constexpr int64_t kChunkTokens = 16;  // tokens whose hits are resolved together (bounded scratch)

// Forward over any row format. Each thread takes a contiguous token range and works through it in
// chunks: first every hit of the chunk is resolved through the permutation (independent loads that
// overlap, and the row prefetches no longer wait on them), then one gather loop runs over all hits
// of the chunk, across token boundaries, prefetching rows `ahead` hits ahead. Every output element
// sums its terms in hit order, so the result does not depend on the thread count.
template <typename T, typename Rows>
void forward_rows(const PoolShape& s, const Rows& rows, const int64_t* index, const T* scores,
                  const int64_t* perm, T* out) {
  const int64_t K = s.K, N = s.N, Dv = s.Dv, C = s.C, Ds = Dv / C, width = s.E * Dv;
  // About 4 KiB of rows in flight: 4 fp32 rows of 1 KiB, 8 bf16 or 16 int8 rows of Dv = 256.
  const int64_t ahead = std::clamp<int64_t>(4096 / std::max<int64_t>(1, rows.row_bytes()), 4, 16);
  const bool pow2 = (N & (N - 1)) == 0;
  int shift = 0;
  while (pow2 && (int64_t(1) << shift) < N) ++shift;
#pragma omp parallel if (s.T > 1)
  {
    const int64_t nt = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t t_begin = s.T * id / nt, t_end = s.T * (id + 1) / nt;
    std::vector<int64_t> row(kChunkTokens * K), dst(kChunkTokens * K);
    for (int64_t t0 = t_begin; t0 < t_end; t0 += kChunkTokens) {
      const int64_t t1 = std::min(t_end, t0 + kChunkTokens), hits = (t1 - t0) * K;
      const int64_t* idx = index + t0 * K;
      for (int64_t t = t0, e = 0; t < t1; ++t)
        for (int64_t k = 0; k < K; ++k, ++e) {
          const int64_t v = perm ? perm[idx[e]] : idx[e];
          const int64_t p = pow2 ? v >> shift : v / N;
          row[e] = v - p * N;
          dst[e] = t * width + p * Dv;
        }
      std::memset(out + t0 * width, 0, sizeof(T) * (t1 - t0) * width);
      for (int64_t e = 0; e < std::min(ahead, hits); ++e) rows.prefetch(row[e]);
      const T* w = scores + t0 * K * C;
      for (int64_t e = 0; e < hits; ++e) {
        if (e + ahead < hits) rows.prefetch(row[e + ahead]);
        T* o = out + dst[e];
        for (int64_t c = 0; c < C; ++c)
          rows.axpy(o + c * Ds, rows.row_weight(row[e], w[e * C + c]), row[e], c * Ds, Ds);
      }
    }
  }
}

template <typename T>
void forward(const PoolShape& s, const T* values, const int64_t* index, const T* scores,
             const int64_t* perm, T* out) {
  forward_rows(s, PlainRows<T>{values, s.Dv}, index, scores, perm, out);
}
template <typename T>
void forward_bf16(const PoolShape& s, const uint16_t* values, const int64_t* index, const T* scores,
                  const int64_t* perm, T* out) {
  forward_rows(s, Bf16Rows<T>{values, s.Dv}, index, scores, perm, out);
}
template <typename T>
void forward_int8(const PoolShape& s, const int8_t* values, const float* row_scale, const int64_t* index,
                  const T* scores, const int64_t* perm, T* out) {
  forward_rows(s, Int8Rows<T>{values, row_scale, s.Dv}, index, scores, perm, out);
}

template <typename T>
void backward_scores(const PoolShape& s, const T* values, const int64_t* index, const int64_t* perm,
                     const T* dout, T* dscores) {
  const int64_t K = s.K, N = s.N, Dv = s.Dv, C = s.C, Ds = Dv / C, width = s.E * Dv;
#pragma omp parallel if (s.T > 1)
  {
    Hits hits;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < s.T; ++t) {
      hits.resolve(index + t * K, perm, K, N);
      for (int64_t k = 0; k < kPrefetchAhead; ++k) hits.prefetch(values, k, Dv);
      for (int64_t k = 0; k < K; ++k) {
        hits.prefetch(values, k + kPrefetchAhead, Dv);
        const T* val = values + hits.row[k] * Dv;
        const T* g = dout + t * width + hits.group[k] * Dv;
        T* ds = dscores + (t * K + k) * C;
        for (int64_t c = 0; c < C; ++c) ds[c] = simd::dot(val + c * Ds, g + c * Ds, Ds);
      }
    }
  }
}

template <typename T>
void backward_values(const PoolShape& s, const RowGroups& groups, const T* scores, const T* dout,
                     T* grad_rows) {
  const int64_t K = s.K, Dv = s.Dv, C = s.C, Ds = Dv / C, width = s.E * Dv;
  const int64_t U = static_cast<int64_t>(groups.rows.size());
#pragma omp parallel for schedule(dynamic, 64) if (U > 64)
  for (int64_t u = 0; u < U; ++u) {
    T* g = grad_rows + u * Dv;
    std::memset(g, 0, sizeof(T) * Dv);
    for (int64_t e = groups.offsets[u]; e < groups.offsets[u + 1]; ++e) {
      const int64_t hit = groups.entries[e];
      const int64_t t = hit / K;
      const T* w = scores + hit * C;
      const T* d = dout + t * width + int64_t(groups.groups[e]) * Dv;
      for (int64_t c = 0; c < C; ++c) simd::axpy(g + c * Ds, w[c], d + c * Ds, Ds);
    }
  }
}

}  // namespace

template <typename T>
void fill_pool(KernelTable<T>& t) {
  t.pooled_lookup_forward = &forward<T>;
  t.pooled_lookup_forward_bf16 = &forward_bf16<T>;
  t.pooled_lookup_forward_int8 = &forward_int8<T>;
  t.pooled_lookup_backward_scores = &backward_scores<T>;
  t.pooled_lookup_backward_values = &backward_values<T>;
}
template void fill_pool<float>(KernelTable<float>&);
template void fill_pool<double>(KernelTable<double>&);

}  // namespace UM_ISA

#if UM_ISA_GENERIC
// ---- shape check, hit grouping and scalar references (generic build only) ----------------------

const char* pool_check_shape(const PoolShape& s) {
  if (s.T < 0) return "T (tokens) must be >= 0";
  if (s.K < 0) return "K (candidates per token) must be >= 0";
  if (s.N < 1) return "N (value rows) must be >= 1";
  if (s.Dv < 1) return "Dv (value width) must be >= 1";
  if (s.E < 1) return "E (IVE groups) must be >= 1";
  if (s.C < 1) return "C (MCS slices) must be >= 1";
  if (s.Dv % s.C != 0) return "Dv (value width) must be divisible by C (cores)";
  if (s.E > (int64_t(1) << 30)) return "E (IVE groups) is too large";
  return nullptr;
}

void pooled_lookup_prefetch(const PoolShape& s, const void* values, int64_t row_bytes, const float* row_scale,
                            const int64_t* index, const int64_t* perm, int64_t max_bytes) {
  const int64_t hits = s.T * s.K, N = s.N;
  const auto* base = static_cast<const unsigned char*>(values);
  int64_t bytes = 0;
  for (int64_t e = 0; e < hits && bytes < max_bytes; ++e, bytes += row_bytes) {
    const int64_t row = perm[index[e]] % N;
    simd::prefetch_bytes(base + row * row_bytes, row_bytes);
    if (row_scale) __builtin_prefetch(row_scale + row, 0, 1);
  }
}

void group_hits_by_row(const PoolShape& s, const int64_t* index, const int64_t* perm, RowGroups& out) {
  const int64_t total = s.T * s.K, N = s.N;
  std::vector<uint32_t> row(total), row_tmp(total);
  std::vector<int64_t> ent(total), ent_tmp(total);
  std::vector<int32_t> grp(total), grp_tmp(total);
  for (int64_t e = 0; e < total; ++e) {
    const int64_t v = perm[index[e]];
    row[e] = static_cast<uint32_t>(v % N);
    grp[e] = static_cast<int32_t>(v / N);
    ent[e] = e;
  }
  // LSD radix sort on the row, 11 bits per pass; stable, so entries stay ascending within a row.
  int bits = 0;
  while (bits < 32 && (int64_t(1) << bits) < N) ++bits;
  for (int shift = 0; shift < bits; shift += 11) {
    int64_t count[2049] = {0};
    for (int64_t e = 0; e < total; ++e) ++count[((row[e] >> shift) & 2047) + 1];
    for (int d = 0; d < 2048; ++d) count[d + 1] += count[d];
    for (int64_t e = 0; e < total; ++e) {
      const int64_t dst = count[(row[e] >> shift) & 2047]++;
      row_tmp[dst] = row[e];
      ent_tmp[dst] = ent[e];
      grp_tmp[dst] = grp[e];
    }
    row.swap(row_tmp);
    ent.swap(ent_tmp);
    grp.swap(grp_tmp);
  }
  out.rows.clear();
  out.offsets.clear();
  for (int64_t e = 0; e < total; ++e) {
    if (e == 0 || row[e] != row[e - 1]) {
      out.rows.push_back(row[e]);
      out.offsets.push_back(e);
    }
  }
  out.offsets.push_back(total);
  out.entries = std::move(ent);
  out.groups = std::move(grp);
}

template <typename T>
void pooled_lookup_forward_ref(const PoolShape& s, const T* values, const int64_t* index,
                               const T* scores, const int64_t* perm, T* out) {
  const int64_t Ds = s.Dv / s.C;
  std::fill(out, out + s.T * s.E * s.Dv, T(0));
  for (int64_t t = 0; t < s.T; ++t)
    for (int64_t k = 0; k < s.K; ++k) {
      const int64_t v = perm[index[t * s.K + k]], p = v / s.N, row = v % s.N;
      for (int64_t d = 0; d < s.Dv; ++d)
        out[t * s.E * s.Dv + p * s.Dv + d] += scores[(t * s.K + k) * s.C + d / Ds] * values[row * s.Dv + d];
    }
}

template <typename T>
void pooled_lookup_forward_bf16_ref(const PoolShape& s, const uint16_t* values, const int64_t* index,
                                    const T* scores, const int64_t* perm, T* out) {
  const int64_t Ds = s.Dv / s.C;
  std::fill(out, out + s.T * s.E * s.Dv, T(0));
  for (int64_t t = 0; t < s.T; ++t)
    for (int64_t k = 0; k < s.K; ++k) {
      const int64_t v = perm[index[t * s.K + k]], p = v / s.N, row = v % s.N;
      for (int64_t d = 0; d < s.Dv; ++d)
        out[t * s.E * s.Dv + p * s.Dv + d] +=
            scores[(t * s.K + k) * s.C + d / Ds] * T(bf16_to_float(values[row * s.Dv + d]));
    }
}

template <typename T>
void pooled_lookup_forward_int8_ref(const PoolShape& s, const int8_t* values, const float* row_scale,
                                    const int64_t* index, const T* scores, const int64_t* perm, T* out) {
  const int64_t Ds = s.Dv / s.C;
  std::fill(out, out + s.T * s.E * s.Dv, T(0));
  for (int64_t t = 0; t < s.T; ++t)
    for (int64_t k = 0; k < s.K; ++k) {
      const int64_t v = perm[index[t * s.K + k]], p = v / s.N, row = v % s.N;
      for (int64_t d = 0; d < s.Dv; ++d) {
        const T w = scores[(t * s.K + k) * s.C + d / Ds] * T(row_scale[row]);
        out[t * s.E * s.Dv + p * s.Dv + d] += w * T(values[row * s.Dv + d]);
      }
    }
}

template <typename T>
void pooled_lookup_backward_scores_ref(const PoolShape& s, const T* values, const int64_t* index,
                                       const int64_t* perm, const T* dout, T* dscores) {
  const int64_t Ds = s.Dv / s.C;
  std::fill(dscores, dscores + s.T * s.K * s.C, T(0));
  for (int64_t t = 0; t < s.T; ++t)
    for (int64_t k = 0; k < s.K; ++k) {
      const int64_t v = perm[index[t * s.K + k]], p = v / s.N, row = v % s.N;
      for (int64_t d = 0; d < s.Dv; ++d)
        dscores[(t * s.K + k) * s.C + d / Ds] += values[row * s.Dv + d] * dout[t * s.E * s.Dv + p * s.Dv + d];
    }
}

template <typename T>
void pooled_lookup_backward_values_dense_ref(const PoolShape& s, const int64_t* index,
                                             const T* scores, const int64_t* perm, const T* dout,
                                             T* dvalues) {
  const int64_t Ds = s.Dv / s.C;
  std::fill(dvalues, dvalues + s.N * s.Dv, T(0));
  for (int64_t t = 0; t < s.T; ++t)
    for (int64_t k = 0; k < s.K; ++k) {
      const int64_t v = perm[index[t * s.K + k]], p = v / s.N, row = v % s.N;
      for (int64_t d = 0; d < s.Dv; ++d)
        dvalues[row * s.Dv + d] += scores[(t * s.K + k) * s.C + d / Ds] * dout[t * s.E * s.Dv + p * s.Dv + d];
    }
}

#define UM_INSTANTIATE_POOL_REF(T)                                                                     \
  template void pooled_lookup_forward_ref<T>(const PoolShape&, const T*, const int64_t*, const T*,    \
                                             const int64_t*, T*);                                     \
  template void pooled_lookup_forward_bf16_ref<T>(const PoolShape&, const uint16_t*, const int64_t*,  \
                                                  const T*, const int64_t*, T*);                      \
  template void pooled_lookup_forward_int8_ref<T>(const PoolShape&, const int8_t*, const float*,      \
                                                  const int64_t*, const T*, const int64_t*, T*);      \
  template void pooled_lookup_backward_scores_ref<T>(const PoolShape&, const T*, const int64_t*,      \
                                                     const int64_t*, const T*, T*);                   \
  template void pooled_lookup_backward_values_dense_ref<T>(const PoolShape&, const int64_t*, const T*, \
                                                           const int64_t*, const T*, T*);
UM_INSTANTIATE_POOL_REF(float)
UM_INSTANTIATE_POOL_REF(double)
#endif  // UM_ISA_GENERIC

}  // namespace ultramem::kernels
