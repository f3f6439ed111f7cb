// Where the trainer gets its batches from, as callbacks: a data::BatchSampler or the fact task behind
// them (run.h glues them), so that the trainer knows nothing about corpora or tasks.
#pragma once
#include <cstdint>
#include <functional>

#include "ultramem/data/batch.h"

namespace ultramem::train {

using data::Batch;

struct BatchSource {
  std::function<Batch()> next;                   // required: the next training micro-batch
  std::function<int64_t()> position;             // optional: data position, saved in checkpoints
  std::function<void(int64_t)> set_position;     // optional: restores it on resume
};

}  // namespace ultramem::train
