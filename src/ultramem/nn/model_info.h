// Parameter counts (total and activated per token) and forward FLOPs per token of a ModelConfig,
// split by part of the model; for `ultramem info CONFIG` and docs/model.md. No libtorch needed.
// A multiply-add counts as 2 FLOPs; element-wise work (norms, activations, softmax, top-k) is not
// counted. Attention score/value FLOPs are counted at `context` keys per query.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "ultramem/nn/model_config.h"

namespace ultramem::nn {

struct ModelInfoPart {
  std::string name;              // "embedding", "lm_head", "attention", "norms", "dense_ffn",
                                 // "moe_router", "moe_experts", "memory_dense", "memory_values"
  int64_t params_total = 0;      // parameters of this part
  int64_t params_activated = 0;  // parameters a token reads in the forward pass
  double flops = 0;              // forward FLOPs per token
};

struct ModelInfo {
  std::vector<ModelInfoPart> parts;  // in the order above; parts a model lacks are left out
  int64_t params_total = 0;
  int64_t params_activated = 0;
  double flops_per_token = 0;        // forward
  int64_t context = 0;               // keys per query assumed for the attention FLOPs
  const ModelInfoPart* find(const std::string& name) const;  // nullptr when absent
};

// context <= 0 means max_seq_len / 2 (the mean over the positions of a full training sequence).
ModelInfo model_info(const ModelConfig& cfg, int64_t context = 0);

std::string model_info_table(const ModelInfo& info);  // aligned text table with a total row
nlohmann::json model_info_to_json(const ModelInfo& info);

}  // namespace ultramem::nn
