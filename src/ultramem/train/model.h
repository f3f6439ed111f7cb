// What the trainer needs from a language model: exactly the public API of nn::Transformer
// (forward, aux_losses, after_optimizer_step, param_groups, telemetry, config), behind an interface so
// that the trainer depends on nothing else. transformer_model.h adapts nn::Transformer to it.
#pragma once
#include <torch/nn/module.h>
#include <torch/types.h>

#include <map>
#include <string>

#include <nlohmann/json_fwd.hpp>

#include "ultramem/nn/transformer.h"

namespace ultramem::train {

class TrainableModel {
 public:
  virtual ~TrainableModel() = default;

  // tokens: [B, T] int64 -> logits [B, T, vocab]; also computes this forward's auxiliary losses.
  virtual torch::Tensor forward(const torch::Tensor& tokens) = 0;
  // Named auxiliary losses of the last forward (scalars, coefficients applied).
  virtual std::map<std::string, torch::Tensor> aux_losses() = 0;
  // Called once after every optimizer step.
  virtual void after_optimizer_step() = 0;
  // Every trainable parameter exactly once, split by optimizer treatment.
  virtual nn::ParamGroups param_groups() = 0;
  // Flat telemetry since the last call (resets the model's windows).
  virtual nlohmann::json telemetry() = 0;
  // The model configuration as JSON (stored in checkpoints and compared on load).
  virtual nlohmann::json config_json() const = 0;
  // The module holding the parameters and buffers (checkpoint names, train()/eval()).
  virtual torch::nn::Module& module() = 0;
};

}  // namespace ultramem::train
