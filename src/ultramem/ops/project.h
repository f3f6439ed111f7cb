// Private to ops/: the dense products of the fused no-grad ops (ultramem_decode, moe_decode, block_decode).
#pragma once
#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "ultramem/kernels/small_matmul.h"
#include "ultramem/ops/block_decode.h"
#include "ultramem/ops/runtime.h"

namespace ultramem::ops::detail {

// Up to this many rows the few-row kernels (matmul_rows, matmul_rows_nt) run the decode step's
// products; from 16 rows on OpenBLAS, whose 16-row tiles then run at or above their speed (measured on
// the decode model's shapes, K = 64..688, N = 256..8192; docs/performance.md, D.14).
constexpr int64_t kSmallRows = 15;

// Up to this many rows int8 dense weights take integer dot products (kernels::matmul_rows_q8); above,
// the widened rows and BLAS. Measured on the decode model (docs/performance.md, D.15): whole models with
// int8 weights 1.15-1.3x faster at batch 16 with the integer dots, 0.83-0.9x at batch 64.
constexpr int64_t kQ8Rows = 16;

// v's storage, grown to at least n elements (scratch buffers reused across calls).
template <typename V>
V* sized(std::vector<V>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
  return v.data();
}

template <typename S>
constexpr torch::Dtype dtype_of() {
  return std::is_same_v<S, float> ? torch::kFloat : torch::kDouble;
}

// The rows of b [N, K] (S, bfloat16 or int8 with `scale` [N]) as a kernel row table; b contiguous.
template <typename S>
kernels::RowTable<S> row_table(const at::Tensor& b, const at::Tensor& scale) {
  kernels::RowTable<S> t;
  if (b.scalar_type() == at::kBFloat16) {
    t.format = kernels::RowFormat::kBf16;
    t.data = b.data_ptr();
  } else if (b.scalar_type() == at::kChar) {
    t.format = kernels::RowFormat::kInt8;
    t.data = b.data_ptr<int8_t>();
    t.scale = scale.data_ptr<float>();
  } else {
    t.data = b.data_ptr<S>();
  }
  return t;
}

// Per-thread scratch of the compact products above kSmallRows (widened rows, partial products).
template <typename S>
std::vector<S>& widen_scratch(int which) {
  thread_local std::vector<S> buf[2];
  return buf[which];
}

// With ultramem::batch_invariant() every row count takes the row kernels (each row's result is the same
// whatever rows are around it: runtime.h).
// out[rows, N] = x[rows, K] @ b^T for b [N, K] rows (contiguous; S, bfloat16, or int8 with `scale`
// [N]): up to kSmallRows rows the dot kernel reads b in place; above, BLAS on b (float) or on blocks of
// 512 rows widened in cache (compact). With q8, float32 x, int8 b and up to kQ8Rows rows, x is quantised
// to int8 too and the product taken in integer dots (kernels::matmul_rows_q8): the dense int8 weights
// at decode batches. Key scoring keeps the widened dots (its indices are compared with the float
// keys').
template <typename S>
void project_nt(const S* x, int64_t rows, int64_t K, const at::Tensor& b, const at::Tensor& scale, S* out,
                bool q8 = false) {
  const int64_t N = b.size(0);
  const bool invariant = batch_invariant();
  if constexpr (std::is_same_v<S, float>) {
    if (q8 && b.scalar_type() == at::kChar && (rows <= kQ8Rows || invariant)) {
      kernels::matmul_rows_q8(rows, K, N, x, b.data_ptr<int8_t>(), scale.data_ptr<float>(), out);
      return;
    }
  }
  if (rows <= kSmallRows || invariant) {
    kernels::matmul_rows_nt_q<S>(rows, K, N, x, row_table<S>(b, scale), out);
    return;
  }
  const auto o = torch::TensorOptions().dtype(dtype_of<S>());
  const torch::Tensor xt = torch::from_blob(const_cast<S*>(x), {rows, K}, o);
  if (b.scalar_type() == dtype_of<S>()) {
    torch::Tensor dst = torch::from_blob(out, {rows, N}, o);
    at::mm_out(dst, xt, b.t());
    return;
  }
  constexpr int64_t kBlock = 2048;  // rows widened per product: few BLAS calls over a large key table
  std::vector<S>& wide = widen_scratch<S>(0);
  std::vector<S>& part = widen_scratch<S>(1);
  wide.resize(kBlock * K);
  part.resize(rows * kBlock);
  const auto tab = row_table<S>(b, scale);
  for (int64_t j0 = 0; j0 < N; j0 += kBlock) {
    const int64_t nb = std::min(kBlock, N - j0);
    kernels::widen_rows<S>(tab, K, j0, nb, wide.data());
    torch::Tensor dst = torch::from_blob(part.data(), {rows, nb}, o);
    at::mm_out(dst, xt, torch::from_blob(wide.data(), {nb, K}, o).t());
    for (int64_t t = 0; t < rows; ++t) std::copy(part.data() + t * nb, part.data() + (t + 1) * nb, out + t * N + j0);
  }
}

// out[rows, N] = x[rows, K] @ w[K, N] (w contiguous, dtype S): the few-row kernel or BLAS.
template <typename S>
void project(const S* x, int64_t rows, int64_t K, const torch::Tensor& w, S* out) {
  const int64_t N = w.size(1);
  if (rows <= kSmallRows || batch_invariant()) {
    kernels::matmul_rows<S>(rows, K, N, x, w.data_ptr<S>(), out);
    return;
  }
  const auto o = torch::TensorOptions().dtype(dtype_of<S>());
  torch::Tensor dst = torch::from_blob(out, {rows, N}, o);
  at::mm_out(dst, torch::from_blob(const_cast<S*>(x), {rows, K}, o), w);
}

// The same for a Matrix: float [K, N] as above, compact [N, K] rows through project_nt.
template <typename S>
void project(const S* x, int64_t rows, int64_t K, const Matrix& w, S* out) {
  if (w.compact())
    project_nt<S>(x, rows, K, w.w, w.scale, out, /*q8=*/true);
  else
    project<S>(x, rows, K, w.w, out);
}

// Output columns of a checked Matrix: float [K, N] -> N, compact [N, K] -> N.
inline int64_t out_features(const Matrix& m) { return m.compact() ? m.w.size(0) : m.w.size(1); }

// y[0:D] = x[0:D] * rsqrt(mean(x^2) + eps) * w[0:D], the mean of squares in float64 (y may be x).
template <typename S>
void rms_normalise_row(const S* x, int64_t D, const S* w, double eps, S* y) {
  double ss = 0;
  for (int64_t i = 0; i < D; ++i) ss += double(x[i]) * double(x[i]);
  const S r = S(1.0 / std::sqrt(ss / double(D) + eps));
  for (int64_t i = 0; i < D; ++i) y[i] = x[i] * r * w[i];
}

// out[rows, D] = (silu(x W_gate) * (x W_up)) W_down for x [rows, D], w_in [D, 2*h] (gate | up),
// w_out [h, D] (both contiguous, dtype S, or compact rows [2*h, D] and [D, h]): the dense FFN and each
// MoE expert. hid [rows, 2*h] and act [rows, h] are scratch.
template <typename S>
void swiglu_rows(const S* x, int64_t rows, int64_t D, const Matrix& w_in, const Matrix& w_out,
                 std::vector<S>& hid, std::vector<S>& act, S* out) {
  const int64_t h = out_features(w_in) / 2;
  hid.resize(rows * 2 * h);
  project<S>(x, rows, D, w_in, hid.data());
  act.resize(rows * h);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < h; ++i) {
      const S g = hid[r * 2 * h + i], u = hid[r * 2 * h + h + i];
      act[r * h + i] = g / (S(1) + std::exp(-g)) * u;  // silu(gate) * up
    }
  project<S>(act.data(), rows, h, w_out, out);
}

}  // namespace ultramem::ops::detail
