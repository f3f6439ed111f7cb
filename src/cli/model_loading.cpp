#include "model_loading.h"

#include <torch/torch.h>

#include "ultramem/nn/model_config.h"
#include "ultramem/train/checkpoint.h"

namespace ultramem::cli {

nn::Transformer load_transformer(const std::string& checkpoint_path) {
  const auto ckpt = train::read_checkpoint(checkpoint_path);
  const auto cfg = nn::model_config_from_json(ckpt.model_config);
  nn::Transformer model(cfg);
  train::load_model_state(ckpt, *model, nn::model_config_to_json(model->config()));
  model->eval();
  return model;
}

}  // namespace ultramem::cli
