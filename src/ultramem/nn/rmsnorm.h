// RMSNorm with a learned per-feature scale (no bias): y = x * rsqrt(mean(x^2) + eps) * weight.
#pragma once
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

namespace ultramem::nn {

class RMSNormImpl : public torch::nn::Module {
 public:
  RMSNormImpl(int64_t dim, double eps) : eps_(eps) {
    weight = register_parameter("weight", torch::ones({dim}));
  }

  // x: [..., dim] -> [..., dim]
  torch::Tensor forward(const torch::Tensor& x) {
    return x * torch::rsqrt(x.pow(2).mean(-1, /*keepdim=*/true) + eps_) * weight;
  }

  torch::Tensor weight;  // [dim], starts at 1

 private:
  double eps_;
};
TORCH_MODULE(RMSNorm);

}  // namespace ultramem::nn
