// The one batch type of the project: what the sampler, the fact task, the trainer and evaluation pass.
#pragma once
#include <torch/types.h>

namespace ultramem::data {

struct Batch {
  torch::Tensor inputs;   // [B, T] int64 token ids
  torch::Tensor targets;  // [B, T] int64 next-token ids: targets[b][t] = inputs[b][t + 1] within the window
};

}  // namespace ultramem::data
