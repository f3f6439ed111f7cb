// Private to ops/: the dense products of the fused no-grad ops (ultramem_decode, moe_decode).
#pragma once
#include <torch/torch.h>

#include <cstdint>
#include <type_traits>

#include "ultramem/kernels/small_matmul.h"

namespace ultramem::ops::detail {

// Below this many rows the few-row kernel beats BLAS for a projection on this project's shapes
// (measured with D = 512, E*Dv = 1024; docs/performance.md, "Inference path").
constexpr int64_t kSmallRowsProjection = 8;

template <typename S>
constexpr torch::Dtype dtype_of() {
  return std::is_same_v<S, float> ? torch::kFloat : torch::kDouble;
}

// out[rows, N] = x[rows, K] @ w[K, N] (w contiguous, dtype S): the few-row kernel or BLAS.
template <typename S>
void project(const S* x, int64_t rows, int64_t K, const torch::Tensor& w, S* out) {
  const int64_t N = w.size(1);
  if (rows <= kSmallRowsProjection) {
    kernels::matmul_rows<S>(rows, K, N, x, w.data_ptr<S>(), out);
    return;
  }
  const auto o = torch::TensorOptions().dtype(dtype_of<S>());
  torch::Tensor dst = torch::from_blob(out, {rows, N}, o);
  at::mm_out(dst, torch::from_blob(const_cast<S*>(x), {rows, K}, o), w);
}

}  // namespace ultramem::ops::detail
