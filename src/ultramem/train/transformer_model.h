// Adapts nn::Transformer to the trainer's TrainableModel interface (a pass-through of its public API).
#pragma once
#include <memory>
#include <utility>

#include <nlohmann/json.hpp>

#include "ultramem/nn/model_config.h"
#include "ultramem/nn/transformer.h"
#include "ultramem/train/model.h"

namespace ultramem::train {

class TransformerModel final : public TrainableModel {
 public:
  explicit TransformerModel(nn::Transformer model) : model_(std::move(model)) {}

  torch::Tensor forward(const torch::Tensor& tokens) override { return model_->forward(tokens); }
  std::map<std::string, torch::Tensor> aux_losses() override { return model_->aux_losses(); }
  void after_optimizer_step() override { model_->after_optimizer_step(); }
  nn::ParamGroups param_groups() override { return model_->param_groups(); }
  nlohmann::json telemetry() override { return model_->telemetry(); }
  nlohmann::json config_json() const override { return nn::model_config_to_json(model_->config()); }
  torch::nn::Module& module() override { return *model_; }

  nn::Transformer& transformer() { return model_; }

 private:
  nn::Transformer model_;
};

inline std::shared_ptr<TrainableModel> as_trainable(nn::Transformer model) {
  return std::make_shared<TransformerModel>(std::move(model));
}

}  // namespace ultramem::train
