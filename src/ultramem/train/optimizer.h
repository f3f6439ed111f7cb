// AdamW over named parameter groups, with a row-sparse ("lazy") variant for huge tables such as the
// memory values. Own implementation (not torch::optim) so that sparse gradients and the state layout
// of checkpoints are under this project's control. Semantics (docs/training.md):
//
// Dense AdamW, for every element of a parameter p with gradient g, global step count t (1-based):
//   p <- p * (1 - lr * wd)                               (decoupled weight decay)
//   m <- b1 * m + (1 - b1) * g
//   v <- b2 * v + (1 - b2) * g^2
//   p <- p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
// which is torch.optim.AdamW's update. Parameters without a gradient are skipped that step.
//
// Row-sparse AdamW (lazy Adam), for a parameter [R, ...] whose gradient touches a set of rows:
//   - touched rows get exactly the dense update above (same t, same bias corrections);
//   - untouched rows are left alone entirely: weights, m and v unchanged (moments do not decay, no
//     weight decay that step).
//   Touched rows are the rows of a sparse COO gradient with one sparse dimension (coalesced first, so
//   duplicate rows are summed); for a dense gradient, the rows holding any non-zero element; other
//   sparse layouts are densified first. Cost: O(touched rows x row width), plus O(R) for a dense
//   gradient's row scan.
#pragma once
#include <torch/types.h>

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace ultramem::train {

struct ParamGroup {
  std::string name;                      // "decay", "no_decay", "memory_values", ...
  std::vector<torch::Tensor> params;     // parameters updated in place (contiguous, float/double)
  std::vector<std::string> param_names;  // one per parameter: keys of its state in checkpoints
  double lr_mult = 1.0;                  // lr of this group = step lr * lr_mult (changeable per step)
  double weight_decay = 0.0;             // decoupled weight decay coefficient
  bool row_sparse = false;               // lazy row-sparse update (see above) instead of dense
};

struct AdamWOptions {
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
};

class AdamW {
 public:
  // Throws std::invalid_argument for a bad option, a parameter that is not a contiguous
  // floating-point dense tensor, a row-sparse parameter with no dimension, a parameter listed twice,
  // or param_names that do not match params one to one (or repeat a name).
  explicit AdamW(std::vector<ParamGroup> groups, AdamWOptions options = {});

  // One update with base learning rate `lr` (each group uses lr * lr_mult). Increments the step count
  // first (bias corrections use the new count). Gradients are read from p.grad().
  void step(double lr);

  // Drops every gradient (p.grad() becomes undefined), so the next backward starts from scratch.
  void zero_grad();

  int64_t step_count() const { return step_; }
  const AdamWOptions& options() const { return opt_; }
  std::vector<ParamGroup>& groups() { return groups_; }
  const std::vector<ParamGroup>& groups() const { return groups_; }
  ParamGroup& group(const std::string& name);  // throws std::invalid_argument when absent

  // State as named tensors: "<param name>.exp_avg", "<param name>.exp_avg_sq" (same shape and dtype as
  // the parameter) and "step" (int64 scalar). The tensors alias the live state (no copy).
  std::vector<std::pair<std::string, torch::Tensor>> state_tensors() const;
  // Restores what state_tensors() produced. Every key must be present with the right shape and dtype,
  // and no other key may appear; otherwise std::runtime_error naming the key (nothing is modified).
  void load_state_tensors(const std::map<std::string, torch::Tensor>& state);

 private:
  struct State {
    torch::Tensor exp_avg;     // same shape as the parameter
    torch::Tensor exp_avg_sq;  // same shape as the parameter
  };
  std::vector<ParamGroup> groups_;
  std::vector<std::vector<State>> state_;  // [group][param]
  AdamWOptions opt_;
  int64_t step_ = 0;
};

}  // namespace ultramem::train
