// Gradient clipping by the global L2 norm over a set of parameters with dense and/or sparse gradients.
#pragma once
#include <torch/types.h>

#include <vector>

namespace ultramem::train {

// Global norm sqrt(sum over parameters of ||grad||^2): per-parameter norms in the gradient's dtype,
// their squares summed in double. Sparse COO gradients are coalesced first (in place: p.grad() is
// replaced by its coalesced form), so duplicate entries of an uncoalesced gradient are summed before
// squaring. Parameters without a gradient contribute 0.
double grad_norm(const std::vector<torch::Tensor>& params);

// Computes grad_norm(params); if max_norm > 0 and the norm exceeds it, scales every gradient by
// max_norm / (norm + 1e-6). Returns the norm before clipping (may be inf/nan; then nothing is scaled).
double clip_grad_norm(const std::vector<torch::Tensor>& params, double max_norm);

// The scaling step of clip_grad_norm for a norm computed elsewhere (e.g. across processes): if
// max_norm > 0 and the finite `norm` exceeds it, scales every gradient by max_norm / (norm + 1e-6).
// Sparse gradients must be coalesced (grad_norm does that). Returns `norm`.
double scale_grads_to_max_norm(const std::vector<torch::Tensor>& params, double norm, double max_norm);

}  // namespace ultramem::train
