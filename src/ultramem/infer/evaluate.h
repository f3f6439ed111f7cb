// Validation loss of a language model over fixed batches (eval mode, no autograd state).
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

#include "ultramem/data/sampler.h"
#include "ultramem/nn/transformer.h"

namespace ultramem::infer {

struct LossResult {
  double loss = 0;     // mean next-token cross-entropy, nats per target token
  int64_t tokens = 0;  // target tokens scored
};

// Scores every target token of `batches` under torch::NoGradGuard. progress(done, total) runs after
// each batch when given. std::invalid_argument for an empty batch list.
LossResult mean_loss(nn::Transformer& model, const std::vector<data::Batch>& batches,
                     const std::function<void(size_t, size_t)>& progress = {});

}  // namespace ultramem::infer
