// Where the trainer gets its batches from, as callbacks, so train/ does not depend on data/: the
// command line glues a data::BatchSampler to it (next -> sampler.next(), position/set_position ->
// the sampler's position()/set_position()).
#pragma once
#include <torch/types.h>

#include <cstdint>
#include <functional>

namespace ultramem::train {

struct Batch {
  torch::Tensor inputs;   // [B, T] int64 token ids
  torch::Tensor targets;  // [B, T] int64 next-token ids
};

struct BatchSource {
  std::function<Batch()> next;                   // required: the next training micro-batch
  std::function<int64_t()> position;             // optional: data position, saved in checkpoints
  std::function<void(int64_t)> set_position;     // optional: restores it on resume
};

}  // namespace ultramem::train
