// Product-key memory baseline (Lample et al. 2019, spec section 7): per-head queries, additive
// row + column scores, top-m, softmax over the m, one value table. The first steps of the paper's
// ablation ladder are options: no softmax (PKMConfig::softmax) and one shared query (shared_query). Retrieval and pooling run on the
// same ops as UltraMem: the additive score s_row[i] + s_col[j] is TDQKR with rank 2, core = I,
// S_row' = [s_row; 1], S_col' = [1; s_col] and filter u = (1, 0), v = (0, 1), which is exact.
#pragma once
#include <torch/nn/module.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include "ultramem/nn/memory_config.h"

namespace ultramem::nn {

class PKMImpl : public torch::nn::Module {
 public:
  explicit PKMImpl(PKMConfig cfg);

  // x: [..., D] -> [..., D]
  torch::Tensor forward(const torch::Tensor& x);

  void to(torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Device device, torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Device device, bool non_blocking = false) override;

  const PKMConfig& config() const { return cfg_; }

  torch::Tensor wq;      // [D, H*2*Dk]    per-head queries (row half, col half); [D, 2*Dk] when shared
  torch::Tensor keys;    // [H, 2, n, Dk]  product keys
  torch::Tensor values;  // [n*n, Dv]
  torch::Tensor wo;      // [Dv, D]        only when Dv != D (undefined otherwise)
  torch::nn::BatchNorm1d bn{nullptr};  // query BatchNorm over the wq features (QueryNorm::Batch)
  torch::nn::LayerNorm ln{nullptr};    // query LayerNorm over Dk per half (QueryNorm::Layer)
  torch::Tensor perm;    // [n*n] int64 identity (no value expansion)
  torch::Tensor cores;   // [1, H, 2, 2] identity cores (constant)
  torch::Tensor u_vec;   // [H, 2] = (1, 0)
  torch::Tensor v_vec;   // [H, 2] = (0, 1)

 private:
  PKMConfig cfg_;
};
TORCH_MODULE(PKM);

}  // namespace ultramem::nn
