// Run-time choice of the kernel build (AVX2/FMA when the CPU has it, else generic) and the public
// entry points declared in tdqkr.h, pooled_lookup.h and small_matmul.h.
#include <cstdlib>
#include <cstring>

#include "ultramem/kernels/cpu_features.h"
#include "ultramem/kernels/isa.h"
#include "ultramem/kernels/kernel_table.h"

namespace ultramem::kernels {
namespace {

bool want_avx2() {
#if defined(UM_HAVE_AVX2_BUILD)
  const char* force = std::getenv("ULTRAMEM_ISA");
  if (force && std::strcmp(force, "generic") == 0) return false;
  return cpu_has_avx2_fma();
#else
  return false;
#endif
}

template <typename T>
KernelTable<T> make_table() {
  KernelTable<T> t{};
#if defined(UM_HAVE_AVX2_BUILD)
  if (want_avx2()) {
    avx2::fill_tdqkr(t);
    avx2::fill_pool(t);
    avx2::fill_small_matmul(t);
    return t;
  }
#endif
  generic::fill_tdqkr(t);
  generic::fill_pool(t);
  generic::fill_small_matmul(t);
  return t;
}

template <typename T>
const KernelTable<T>& table() {
  static const KernelTable<T> t = make_table<T>();
  return t;
}

}  // namespace

const char* active_isa() { return want_avx2() ? "avx2" : "generic"; }

template <typename T>
void tdqkr_filter(const TdqkrShape& s, const T* s_row, const T* s_col, const T* u, const T* v,
                  int32_t* idx_row, int32_t* idx_col) {
  table<T>().tdqkr_filter(s, s_row, s_col, u, v, idx_row, idx_col);
}
template <typename T>
void tdqkr_rescore(const TdqkrShape& s, const T* s_row, const T* s_col, const T* cores,
                   const int32_t* idx_row, const int32_t* idx_col, T* scores, int64_t* index) {
  table<T>().tdqkr_rescore(s, s_row, s_col, cores, idx_row, idx_col, scores, index);
}
template <typename T>
void tdqkr_forward(const TdqkrShape& s, const T* s_row, const T* s_col, const T* cores, const T* u,
                   const T* v, T* scores, int64_t* index) {
  table<T>().tdqkr_forward(s, s_row, s_col, cores, u, v, scores, index);
}
template <typename T>
void tdqkr_backward(const TdqkrShape& s, const T* s_row, const T* s_col, const T* cores,
                    const int64_t* index, const T* dscores, T* ds_row, T* ds_col, T* dcores) {
  table<T>().tdqkr_backward(s, s_row, s_col, cores, index, dscores, ds_row, ds_col, dcores);
}
template <typename T>
void pooled_lookup_forward(const PoolShape& s, const T* values, const int64_t* index, const T* scores,
                           const int64_t* perm, T* out) {
  table<T>().pooled_lookup_forward(s, values, index, scores, perm, out);
}
template <typename T>
void pooled_lookup_forward_bf16(const PoolShape& s, const uint16_t* values, const int64_t* index,
                                const T* scores, const int64_t* perm, T* out) {
  table<T>().pooled_lookup_forward_bf16(s, values, index, scores, perm, out);
}
template <typename T>
void pooled_lookup_forward_int8(const PoolShape& s, const int8_t* values, const float* row_scale,
                                const int64_t* index, const T* scores, const int64_t* perm, T* out) {
  table<T>().pooled_lookup_forward_int8(s, values, row_scale, index, scores, perm, out);
}
template <typename T>
void pooled_lookup_backward_scores(const PoolShape& s, const T* values, const int64_t* index,
                                   const int64_t* perm, const T* dout, T* dscores) {
  table<T>().pooled_lookup_backward_scores(s, values, index, perm, dout, dscores);
}
template <typename T>
void pooled_lookup_backward_values(const PoolShape& s, const RowGroups& groups, const T* scores,
                                   const T* dout, T* grad_rows) {
  table<T>().pooled_lookup_backward_values(s, groups, scores, dout, grad_rows);
}
template <typename T>
void matmul_rows(int64_t rows, int64_t K, int64_t N, const T* x, const T* w, T* out) {
  table<T>().matmul_rows(rows, K, N, x, w, out);
}
template <typename T>
void tdqkr_exact(const TdqkrShape& s, const T* s_row, const T* s_col, const T* cores, T* scores, int64_t* index) {
  table<T>().tdqkr_exact(s, s_row, s_col, cores, scores, index);
}
template <typename T>
void matmul_rows_nt(int64_t rows, int64_t K, int64_t M, const T* x, const T* b, T* out) {
  table<T>().matmul_rows_nt(rows, K, M, x, b, out);
}
template <typename T>
void gathered_dots(int64_t K, const T* x, const T* b, const int32_t* rows, int64_t count, T* out) {
  table<T>().gathered_dots(K, x, b, rows, count, out);
}

template <typename T>
void matmul_rows_nt_q(int64_t rows, int64_t K, int64_t M, const T* x, const RowTable<T>& b, T* out) {
  table<T>().matmul_rows_nt_q(rows, K, M, x, b, out);
}
template <typename T>
void gathered_dots_q(int64_t K, const T* x, const RowTable<T>& b, const int32_t* rows, int64_t count, T* out) {
  table<T>().gathered_dots_q(K, x, b, rows, count, out);
}

template <typename T>
void attend_cached(int64_t S, int64_t hd, const T* q, const T* Kc, const T* Vc, T* probs, T* out) {
  table<T>().attend_cached(S, hd, q, Kc, Vc, probs, out);
}

void matmul_rows_q8(int64_t rows, int64_t K, int64_t M, const float* x, const int8_t* w, const float* w_scale,
                    float* out) {
  table<float>().matmul_rows_q8(rows, K, M, x, w, w_scale, out);
}

#define UM_INSTANTIATE_PUBLIC(T)                                                                     \
  template void tdqkr_filter<T>(const TdqkrShape&, const T*, const T*, const T*, const T*, int32_t*, \
                                int32_t*);                                                           \
  template void tdqkr_rescore<T>(const TdqkrShape&, const T*, const T*, const T*, const int32_t*,    \
                                 const int32_t*, T*, int64_t*);                                      \
  template void tdqkr_forward<T>(const TdqkrShape&, const T*, const T*, const T*, const T*, const T*, \
                                 T*, int64_t*);                                                      \
  template void tdqkr_backward<T>(const TdqkrShape&, const T*, const T*, const T*, const int64_t*,   \
                                  const T*, T*, T*, T*);                                             \
  template void tdqkr_exact<T>(const TdqkrShape&, const T*, const T*, const T*, T*, int64_t*);        \
  template void pooled_lookup_forward<T>(const PoolShape&, const T*, const int64_t*, const T*,       \
                                         const int64_t*, T*);                                        \
  template void pooled_lookup_forward_bf16<T>(const PoolShape&, const uint16_t*, const int64_t*,      \
                                              const T*, const int64_t*, T*);                          \
  template void pooled_lookup_forward_int8<T>(const PoolShape&, const int8_t*, const float*,          \
                                              const int64_t*, const T*, const int64_t*, T*);          \
  template void pooled_lookup_backward_scores<T>(const PoolShape&, const T*, const int64_t*,         \
                                                 const int64_t*, const T*, T*);                      \
  template void pooled_lookup_backward_values<T>(const PoolShape&, const RowGroups&, const T*,       \
                                                 const T*, T*);                                      \
  template void matmul_rows<T>(int64_t, int64_t, int64_t, const T*, const T*, T*);                   \
  template void matmul_rows_nt<T>(int64_t, int64_t, int64_t, const T*, const T*, T*);                \
  template void gathered_dots<T>(int64_t, const T*, const T*, const int32_t*, int64_t, T*);          \
  template void matmul_rows_nt_q<T>(int64_t, int64_t, int64_t, const T*, const RowTable<T>&, T*);     \
  template void gathered_dots_q<T>(int64_t, const T*, const RowTable<T>&, const int32_t*, int64_t, T*); \
  template void attend_cached<T>(int64_t, int64_t, const T*, const T*, const T*, T*, T*);
UM_INSTANTIATE_PUBLIC(float)
UM_INSTANTIATE_PUBLIC(double)

}  // namespace ultramem::kernels
