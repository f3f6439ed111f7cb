// SwiGLU feed-forward: y = (silu(x W_gate) * (x W_up)) W_down. The gate and up projections are
// stored side by side in one [D, 2*hidden] matrix so a single matmul computes both. With grad mode
// off the module runs the no-grad op ops::swiglu_forward (ops/block_decode.h).
#pragma once
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include "ultramem/nn/compact_weight.h"
#include "ultramem/ops/block_decode.h"

namespace ultramem::nn {

// x: [T, D], w_in: [D, 2*hidden] (gate | up), w_out: [hidden, D] -> [T, D]. Shared by the dense FFN
// and the MoE experts.
inline torch::Tensor swiglu(const torch::Tensor& x, const torch::Tensor& w_in, const torch::Tensor& w_out) {
  // chunk (one split) rather than two narrows: its backward concatenates once instead of
  // zero-filling a full-size gradient per slice.
  const auto h = x.matmul(w_in).chunk(2, -1);  // gate, up: [..., hidden] each
  return (torch::silu(h[0]) * h[1]).matmul(w_out);
}

class SwiGLUImpl : public torch::nn::Module {
 public:
  // w_in ~ N(0, in_std), w_out ~ N(0, out_std), drawn from `gen` in that order.
  SwiGLUImpl(int64_t d_model, int64_t hidden, at::Generator gen, double in_std, double out_std) {
    w_in = register_parameter("w_in", at::normal(0.0, in_std, {d_model, 2 * hidden}, gen));
    w_out = register_parameter("w_out", at::normal(0.0, out_std, {hidden, d_model}, gen));
  }

  // x: [..., D] -> [..., D]
  torch::Tensor forward(const torch::Tensor& x) {
    if (x.dim() >= 1 && ops::no_grad_op_applies(x, w_in))
      return ops::swiglu_forward(x.reshape({-1, x.size(-1)}), w_in_c_.get(w_in), w_out_c_.get(w_out)).view(x.sizes());
    return swiglu(x, w_in, w_out);
  }

  // Compact copies of w_in and w_out for the no-grad op (nn/compact_weight.h): rounds them in place.
  void set_weight_format(ValueFormat f) {
    w_in_c_.set(w_in, f, true);
    w_out_c_.set(w_out, f, true);
  }
  int64_t compact_bytes() const { return w_in_c_.bytes() + w_out_c_.bytes(); }

  torch::Tensor w_in;   // [D, 2*hidden]  gate | up
  torch::Tensor w_out;  // [hidden, D]

 private:
  CompactWeight w_in_c_, w_out_c_;  // [2*hidden, D] and [D, hidden] compact rows, when set
};
TORCH_MODULE(SwiGLU);

}  // namespace ultramem::nn
