// How the trainer takes part in a run of several processes (data parallel, possibly with parameters of
// which each process holds only a part). The trainer calls these hooks at fixed points of a step and
// knows nothing about what is behind them; dist::DataParallel implements them over c10d. Without a
// ParallelContext the trainer is a single process.
//
// Every hook except rank() and world_size() is collective: all ranks call it, in the same order.
#pragma once
#include <torch/nn/module.h>
#include <torch/types.h>

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "ultramem/checkpoint/checkpoint.h"

namespace ultramem::train {

class ParallelContext {
 public:
  virtual ~ParallelContext() = default;

  virtual int64_t rank() const = 0;
  virtual int64_t world_size() const = 0;

  // Element-wise sum over the ranks, in place; every rank passes the same number of values.
  virtual void all_reduce_sum(std::vector<double>& values) = 0;
  // Every rank gets rank 0's values.
  virtual void broadcast_from_rank0(std::vector<double>& values) = 0;

  // After the backward passes of a step (all micro-batches) and before clipping: turns every rank's
  // gradients of `params` (each rank's loss a mean over its own tokens) into the gradient of the mean of
  // the ranks' losses, as one process on the global batch would have.
  virtual void synchronize_gradients(const std::vector<torch::Tensor>& params) = 0;

  // Global L2 norm of the synchronised gradients of `params` (what clipping compares to grad_clip):
  // a gradient held whole by every rank counts once, a gradient split across ranks counts every part.
  virtual double grad_norm(const std::vector<torch::Tensor>& params) = 0;

  // Checkpoint I/O of a model whose parameters may be split across ranks. `options` as for
  // checkpoint::save_checkpoint (its optimizer's state is split like its parameters). The file at `path`
  // appears (atomically) only once every rank's part is written, so a failure leaves the previous
  // checkpoint readable.
  virtual void save_checkpoint(const std::string& path, const torch::nn::Module& model,
                               const nlohmann::json& model_config, const checkpoint::CheckpointWriteOptions& options) = 0;
  // A checkpoint as this rank holds it: split tensors cut to this rank's part, whatever number of ranks
  // wrote it; the RNG state this rank saved when the world size is unchanged.
  virtual checkpoint::Checkpoint read_checkpoint(const std::string& path) = 0;
};

}  // namespace ultramem::train
