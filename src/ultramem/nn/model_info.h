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

// Memory a model needs, estimated in bytes: fp32 weights; to train, also their gradients and AdamW's two
// moments, and the activations one micro-batch keeps for backward (per token: the block widths, the
// FFN hidden, the attention rows over seq_len keys, the kept memory values and the logits).
struct MemoryNeed {
  double weights = 0;      // params_total x 4
  double optimizer = 0;    // gradients + AdamW moments: 3 x weights (training only)
  double activations = 0;  // training only
  double total() const { return weights + optimizer + activations; }
};
MemoryNeed inference_memory(const ModelInfo& info, bool without_value_tables);
MemoryNeed training_memory(const ModelConfig& cfg, const ModelInfo& info, int64_t batch_size, int64_t seq_len);
// Throws std::invalid_argument ("<what> needs about X GiB (...); this machine has Y GiB of memory and
// swap") when the need exceeds the machine's memory plus swap. Does nothing when that is unknown.
void check_fits_in_memory(const std::string& what, const MemoryNeed& need);

std::string model_info_table(const ModelInfo& info);  // aligned text table with a total row
nlohmann::json model_info_to_json(const ModelInfo& info);

}  // namespace ultramem::nn
