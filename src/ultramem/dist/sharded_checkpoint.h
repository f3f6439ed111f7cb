// Checkpoints of a run whose memory values are split by columns across ranks (format:
// train/checkpoint.h and docs/distributed.md).
//
// Saving, collective:
//   1. rank 0 picks a save token and broadcasts it;
//   2. every rank writes its shard file "<stem>.step<S>.<token>.rank<r>-of-<W>.safetensors" next to
//      `path`: its column slices of the split parameters, of their optimizer moments, and its RNG state;
//   3. the ranks exchange the shard checksums (or a write failure, which every rank then reports);
//   4. rank 0 writes `path`: the shared tensors, rank 0's RNG state, the configs and the manifest naming
//      the shard files with their checksums. This rename is the commit: until it happens, `path` is the
//      previous checkpoint with its own, untouched shard files;
//   5. after a barrier each rank deletes its shard files of earlier saves with the same stem (rank 0
//      also those written with another number of ranks).
// Loading on M ranks: every rank reads the main file and only the shard files holding its columns.
#pragma once
#include <torch/nn/module.h>

#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "ultramem/dist/memory_sharding.h"
#include "ultramem/checkpoint/checkpoint.h"

namespace ultramem::dist {

class Group;

void save_sharded_checkpoint(Group& group, const std::vector<ShardedParameter>& sharded, const std::string& path,
                             const torch::nn::Module& model, const nlohmann::json& model_config,
                             const checkpoint::CheckpointWriteOptions& options);

// `path` (sharded by any number of ranks, or a one-file checkpoint) as this rank holds it: the split
// parameters and their optimizer moments cut to this rank's columns, everything else whole; the RNG
// state this rank saved when the checkpoint has as many ranks as the group.
checkpoint::Checkpoint read_sharded_checkpoint(const Group& group, const std::vector<ShardedParameter>& sharded,
                                          const std::string& path);

}  // namespace ultramem::dist
