// Mixture-of-experts feed-forward: K SwiGLU experts, a softmax router, top-k routing with the
// top-k weights renormalised to sum to 1 (k > 1), and the load-balancing auxiliary loss
// balance_coef * K * sum_e f_e * P_e. Tokens are grouped by expert, so each expert only runs on the
// tokens routed to it. No capacity limit.
#pragma once
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <vector>

#include "ultramem/nn/compact_weight.h"
#include "ultramem/nn/model_config.h"

namespace ultramem::nn {

class MoEImpl : public torch::nn::Module {
 public:
  // router ~ N(0, init_std), expert w_in ~ N(0, init_std), expert w_out ~ N(0, out_std).
  MoEImpl(int64_t d_model, const MoEConfig& cfg, int64_t expert_hidden, at::Generator gen, double init_std,
          double out_std);

  // x: [..., D] -> [..., D]. Also sets balance_loss() and adds the routing counts to the load window.
  torch::Tensor forward(const torch::Tensor& x);

  // Load-balancing loss of the last forward, coefficient applied (scalar; zero before any forward).
  torch::Tensor balance_loss() const { return balance_loss_; }

  // Top-k assignments per expert since the last reset_load(): [K] counts.
  const std::vector<int64_t>& load() const { return load_; }
  void reset_load() { std::fill(load_.begin(), load_.end(), 0); }

  const MoEConfig& config() const { return cfg_; }

  // Compact copies of the expert matrices for the no-grad op (nn/compact_weight.h): rounds them in
  // place. The router stays float (it is small and decides the routing).
  void set_weight_format(ValueFormat f) {
    w_in_c_.set(w_in, f, true);
    w_out_c_.set(w_out, f, true);
  }
  int64_t compact_bytes() const { return w_in_c_.bytes() + w_out_c_.bytes(); }

  torch::Tensor router;  // [D, K]
  torch::Tensor w_in;    // [K, D, 2*expert_hidden]  per expert: gate | up
  torch::Tensor w_out;   // [K, expert_hidden, D]

 private:
  MoEConfig cfg_;
  torch::Tensor balance_loss_;  // scalar
  std::vector<int64_t> load_;   // [K]
  CompactWeight w_in_c_, w_out_c_;  // [K, 2*expert_hidden, D] and [K, D, expert_hidden] rows, when set
};
TORCH_MODULE(MoE);

}  // namespace ultramem::nn
