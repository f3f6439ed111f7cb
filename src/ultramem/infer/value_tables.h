// A whole model's memory value tables for inference: finding the UltraMem and Engram layers, switching
// their storage format (float32 / bf16 / int8, nn/value_table.h) and writing the result as a weights-only
// checkpoint that eval / generate load like any other.
#pragma once
#include <torch/nn/module.h>

#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "ultramem/nn/engram.h"
#include "ultramem/nn/memory_config.h"
#include "ultramem/nn/transformer.h"
#include "ultramem/nn/ultramem.h"

namespace ultramem::infer {

// Checkpoint metadata key recording the value format ("fp32" | "bf16" | "int8").
inline constexpr const char* kValueFormatKey = "value_format";
// Checkpoint metadata key: the key format its fused inference path uses by default (quantize --keys);
// absent means fp32. The key parameters themselves are always stored in float32.
inline constexpr const char* kKeyFormatKey = "key_format";
// Checkpoint metadata key: the storage of the dense matrices the decode ops read (quantize --weights;
// nn::TransformerImpl::set_weight_format); absent means fp32. The parameters are stored in float32,
// already rounded to the recorded format.
inline constexpr const char* kWeightFormatKey = "weight_format";

// The layers of type Layer (nn::UltraMemImpl, nn::EngramImpl) inside `model` with their module names
// (e.g. "memories.0"), in module order.
template <typename Layer>
std::vector<std::pair<std::string, Layer*>> layers_of(torch::nn::Module& model) {
  std::vector<std::pair<std::string, Layer*>> out;
  for (const auto& item : model.named_modules(/*name_prefix=*/"", /*include_self=*/true))
    if (auto* layer = dynamic_cast<Layer*>(item.value().get())) out.emplace_back(item.key(), layer);
  return out;
}
inline std::vector<std::pair<std::string, nn::UltraMemImpl*>> ultramem_layers(torch::nn::Module& model) {
  return layers_of<nn::UltraMemImpl>(model);
}
inline std::vector<std::pair<std::string, nn::EngramImpl*>> engram_layers(torch::nn::Module& model) {
  return layers_of<nn::EngramImpl>(model);
}

// Converts every UltraMem and Engram layer's value table (their set_value_format; errors propagate, named
// by the layer). A model without memory tables is left as it is.
void set_value_format(torch::nn::Module& model, nn::ValueFormat f);

// Sets every UltraMem layer's key format for inference (UltraMemImpl::set_key_format).
void set_key_format(torch::nn::Module& model, nn::ValueFormat f);
// The common key format of the UltraMem layers (kFloat32 when there are none).
nn::ValueFormat key_format(torch::nn::Module& model);

// The common value format of the UltraMem and Engram layers (kFloat32 when there are none). Throws
// std::logic_error when layers differ.
nn::ValueFormat value_format(torch::nn::Module& model);

// Bytes of all UltraMem and Engram value tables, per-row scales included.
int64_t value_bytes(torch::nn::Module& model);

// Writes `model`'s weights (no optimizer state, no generator state) with `model_config` and the value,
// key and weight formats in the metadata (kValueFormatKey, kKeyFormatKey, kWeightFormatKey), plus
// `train_config` when not null. Atomic, like every checkpoint; throws std::runtime_error naming the
// file on failure.
void save_weights(const std::string& path, nn::TransformerImpl& model, const nlohmann::json& model_config,
                  const nlohmann::json& train_config);

}  // namespace ultramem::infer
