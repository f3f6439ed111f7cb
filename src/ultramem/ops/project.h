// Private to ops/: the dense products of the fused no-grad ops (ultramem_decode, moe_decode, block_decode).
#pragma once
#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "ultramem/kernels/small_matmul.h"

namespace ultramem::ops::detail {

// Up to this many rows the few-row kernels (matmul_rows, matmul_rows_nt) run the decode step's
// products; from 16 rows on OpenBLAS, whose 16-row tiles then run at or above their speed (measured on
// the decode model's shapes, K = 64..688, N = 256..8192; docs/performance.md, D.14).
constexpr int64_t kSmallRows = 15;

template <typename S>
constexpr torch::Dtype dtype_of() {
  return std::is_same_v<S, float> ? torch::kFloat : torch::kDouble;
}

// out[rows, N] = x[rows, K] @ w[K, N] (w contiguous, dtype S): the few-row kernel or BLAS.
template <typename S>
void project(const S* x, int64_t rows, int64_t K, const torch::Tensor& w, S* out) {
  const int64_t N = w.size(1);
  if (rows <= kSmallRows) {
    kernels::matmul_rows<S>(rows, K, N, x, w.data_ptr<S>(), out);
    return;
  }
  const auto o = torch::TensorOptions().dtype(dtype_of<S>());
  torch::Tensor dst = torch::from_blob(out, {rows, N}, o);
  at::mm_out(dst, torch::from_blob(const_cast<S*>(x), {rows, K}, o), w);
}

// y[0:D] = x[0:D] * rsqrt(mean(x^2) + eps) * w[0:D], the mean of squares in float64 (y may be x).
template <typename S>
void rms_normalise_row(const S* x, int64_t D, const S* w, double eps, S* y) {
  double ss = 0;
  for (int64_t i = 0; i < D; ++i) ss += double(x[i]) * double(x[i]);
  const S r = S(1.0 / std::sqrt(ss / double(D) + eps));
  for (int64_t i = 0; i < D; ++i) y[i] = x[i] * r * w[i];
}

// out[rows, D] = (silu(x W_gate) * (x W_up)) W_down for x [rows, D], w_in [D, 2*h] (gate | up),
// w_out [h, D] (both contiguous, dtype S): the dense FFN and each MoE expert. hid [rows, 2*h] and
// act [rows, h] are scratch.
template <typename S>
void swiglu_rows(const S* x, int64_t rows, int64_t D, const torch::Tensor& w_in, const torch::Tensor& w_out,
                 std::vector<S>& hid, std::vector<S>& act, S* out) {
  const int64_t h = w_out.size(0);
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
