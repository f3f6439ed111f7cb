// The UltraMem memory layer (spec sections 3-6): shared query, normalised keys, TDQKR retrieval,
// implicit value expansion with multi-core scoring, one output projection.
#pragma once
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <vector>

#include "ultramem/nn/memory_config.h"

namespace ultramem::nn {

// Memory telemetry over the current window (spec section 6).
struct MemoryStats {
  double coverage = 0;        // fraction of the n*n virtual slots hit in the window
  double kl_uniform = 0;      // KL(hit distribution || uniform over the n*n slots), nats
  double top1_score = 0;      // mean over tokens and heads of the best kept score (sum over cores)
  double topm_score = 0;      // mean of all kept scores (sum over cores)
  double output_std = 0;      // std of the layer output, last forward
  double core_l1 = 0;         // largest singular value of the core sum, mean over heads
  double core_l2 = 0;         // second singular value (0 when r == 1), mean over heads
  int64_t tokens = 0;         // tokens seen in the window
};

class UltraMemImpl : public torch::nn::Module {
 public:
  explicit UltraMemImpl(UltraMemConfig cfg);

  // x: [..., D] -> [..., D]
  torch::Tensor forward(const torch::Tensor& x);

  // Tucker aux loss: alpha/(r-1) * sum_h sum_{i>=2} max(0, l_i - tau)^2 over the singular values of
  // each head's core sum. A zero scalar when disabled or r == 1. Depends on the cores only.
  torch::Tensor aux_loss() const;

  // Recomputes the rank-1 filter (u, v) from the SVD of the core sum, with the sign-continuity rule.
  // Call once per optimizer step.
  void refresh_tucker_approx();

  MemoryStats stats() const;
  void reset_stats();

  // Keeps the permutation buffer int64 when the floating dtype changes.
  void to(torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Device device, torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Device device, bool non_blocking = false) override;

  const UltraMemConfig& config() const { return cfg_; }

  // Parameters (registered under these names).
  torch::Tensor wq;       // [D, 2*Dk]           query projection (shared by all heads)
  torch::Tensor q_scale;  // [2, Dk]             query norm scales (row half, col half)
  torch::Tensor keys;     // [H, 2, n, Dk, r]    un-normalised keys
  torch::Tensor k_scale;  // [2, Dk]             key norm scales (row keys, col keys)
  torch::Tensor cores;    // [C, H, r, r]        Tucker cores
  torch::Tensor values;   // [N, Dv]             physical value table
  torch::Tensor wo;       // [E*Dv, D]           output projection (one [Dv, D] block per IVE group)
  // Buffers.
  torch::Tensor perm;     // [E*N] int64         IVE permutation of the grid addresses
  torch::Tensor u_vec;    // [H, r]              rank-1 filter, row side
  torch::Tensor v_vec;    // [H, r]              rank-1 filter, col side

 private:
  torch::Tensor norm(const torch::Tensor& x, const torch::Tensor& scale) const;  // over last dim
  void record_stats(const torch::Tensor& scores, const torch::Tensor& index, const torch::Tensor& out);

  UltraMemConfig cfg_;
  std::vector<int32_t> hits_;   // [n*n] hit counts of the current window
  MemoryStats window_;          // running sums of the current window
  MemoryStats last_;            // the last completed window
  double core_l1_ = 0, core_l2_ = 0;
};
TORCH_MODULE(UltraMem);

}  // namespace ultramem::nn
