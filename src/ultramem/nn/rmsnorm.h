// RMSNorm with a learned per-feature scale (no bias): y = x * rsqrt(mean(x^2) + eps) * weight.
// With grad mode off it runs the no-grad op ops::rms_norm (ops/block_decode.h).
#pragma once
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include "ultramem/ops/block_decode.h"

namespace ultramem::nn {

// x: [..., dim], weight: [dim] -> [..., dim]; x * rsqrt(mean(x^2) + eps) * weight with autograd.
inline torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  return x * torch::rsqrt(x.pow(2).mean(-1, /*keepdim=*/true) + eps) * weight;
}

class RMSNormImpl : public torch::nn::Module {
 public:
  RMSNormImpl(int64_t dim, double eps) : eps_(eps) {
    weight = register_parameter("weight", torch::ones({dim}));
  }

  // x: [..., dim] -> [..., dim]
  torch::Tensor forward(const torch::Tensor& x) {
    if (x.dim() >= 1 && ops::no_grad_op_applies(x, weight))
      return ops::rms_norm(x.reshape({-1, x.size(-1)}), weight, eps_).view(x.sizes());
    return rms_norm(x, weight, eps_);
  }

  torch::Tensor weight;  // [dim], starts at 1

 private:
  double eps_;
};
TORCH_MODULE(RMSNorm);

}  // namespace ultramem::nn
