#include "ultramem/train/grad_clip.h"

#include <ATen/ATen.h>

#include <cmath>

namespace ultramem::train {

double grad_norm(const std::vector<torch::Tensor>& params) {
  at::NoGradGuard no_grad;
  double sq = 0.0;
  for (const auto& p : params) {
    at::Tensor g = p.grad();
    if (!g.defined()) continue;
    if (g.is_sparse()) {
      if (!g.is_coalesced()) {
        g = g.coalesce();
        at::Tensor handle = p;  // shares the TensorImpl: replaces p's gradient
        handle.mutable_grad() = g;
      }
      g = g._values();
    }
    const double n = g.norm().item<double>();  // in the gradient's dtype, as torch's clip_grad_norm_
    sq += n * n;
  }
  return std::sqrt(sq);
}

double clip_grad_norm(const std::vector<torch::Tensor>& params, double max_norm) {
  return scale_grads_to_max_norm(params, grad_norm(params), max_norm);
}

double scale_grads_to_max_norm(const std::vector<torch::Tensor>& params, double norm, double max_norm) {
  if (max_norm <= 0 || !std::isfinite(norm) || norm <= max_norm) return norm;
  const double coef = max_norm / (norm + 1e-6);
  at::NoGradGuard no_grad;
  for (const auto& p : params) {
    at::Tensor g = p.grad();
    if (!g.defined()) continue;
    if (g.is_sparse()) {
      g._values().mul_(coef);  // coalesced by grad_norm; the values alias the gradient
    } else {
      g.mul_(coef);
    }
  }
  return norm;
}

}  // namespace ultramem::train
