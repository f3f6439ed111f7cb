// Training checkpoints: one safetensors file holding the model's parameters and buffers
// ("model.<name>", readable from Python), the optimizer state ("optim.<param name>.exp_avg", ...,
// "optim.step"), the CPU random generator state ("rng.cpu") and string metadata: format, format
// version, model config, train config and trainer state (JSON) and a CRC-32 checksum. Written
// atomically (io::save_safetensors: temporary file, fsync, rename), so a crash mid-write leaves the
// previous checkpoint intact. Format details: docs/training.md.
//
// Sharded checkpoints (written by several ranks, docs/distributed.md): the main file holds every tensor
// that all ranks share plus a manifest (metadata "shards"); each rank's column slices of the split
// tensors (memory values and their optimizer moments) are in shard files next to it, named in the
// manifest together with their checksums. read_checkpoint assembles them transparently, or cuts any
// tensor to the columns a caller asks for (loading N ranks' checkpoint into M ranks).
#pragma once
#include <torch/nn/module.h>
#include <torch/types.h>

#include <map>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

namespace ultramem::checkpoint {

inline constexpr const char* kCheckpointFormat = "ultramem-checkpoint";
inline constexpr int kCheckpointVersion = 1;
inline constexpr const char* kCheckpointShardFormat = "ultramem-checkpoint-shard";
inline constexpr const char* kCheckpointSuffix = ".safetensors";

// Everything a checkpoint holds, as read back.
struct Checkpoint {
  std::string path;
  nlohmann::json model_config;                  // as written by the model's config_json()
  nlohmann::json train_config;                  // null when written without one
  nlohmann::json trainer_state;                 // null when written without one
  std::map<std::string, torch::Tensor> model;   // parameter/buffer name -> tensor ("model." stripped)
  std::map<std::string, torch::Tensor> optim;   // optimizer state ("optim." stripped; empty if none)
  torch::Tensor rng;                            // [S] uint8 CPU generator state; undefined if none
  int64_t shard_world = 0;                      // > 0: a sharded checkpoint written by this many ranks
  std::map<std::string, std::string> metadata;  // all string metadata of the main file (e.g. "value_format")
};

struct CheckpointWriteOptions {
  // Optimizer state to include as "optim.<name>" (train::AdamW::state_tensors()); none when unset.
  std::optional<std::vector<std::pair<std::string, torch::Tensor>>> optim;
  nlohmann::json train_config;                  // stored when not null
  nlohmann::json trainer_state;                 // stored when not null
  bool rng = true;                              // include the CPU generator state
  // Sharded checkpoints only: tensors left out of the main file ("model.<name>", "optim.<name>.exp_avg",
  // ...) because they live in shard files, and the manifest stored as metadata "shards" (see
  // docs/distributed.md). Both empty/null for a one-file checkpoint.
  std::set<std::string> exclude;
  nlohmann::json shards;
  // Further string metadata to store (e.g. "value_format" of a quantised model); the keys written
  // above (format, model_config, ...) are reserved.
  std::map<std::string, std::string> metadata;
};

// Columns [begin, end) of dimension 1.
struct ColumnRange {
  int64_t begin = 0, end = 0;
};

struct CheckpointReadOptions {
  // Tensors (file names: "model.<name>", "optim.<name>.exp_avg", ...) to return cut to these columns
  // of dimension 1, whether the file holds them whole or in shards. Other tensors come whole.
  std::map<std::string, ColumnRange> columns;
  // With a sharded checkpoint written by exactly `world` ranks, Checkpoint::rng is the generator state
  // rank `rank` saved (else rank 0's, from the main file).
  int64_t rank = -1, world = 0;
  // Entries of `columns` naming tensors the file does not have are skipped instead of an error (e.g.
  // optimizer moments asked of a weights-only checkpoint).
  bool skip_missing_columns = false;
};

// Writes `model`'s parameters and buffers with `model_config` and the optional parts. Throws
// std::runtime_error naming the file on failure (the previous file at `path`, if any, is kept).
void save_checkpoint(const std::string& path, const torch::nn::Module& model,
                     const nlohmann::json& model_config, const CheckpointWriteOptions& options = {});

// Writes a checkpoint as read back (read_checkpoint: shards assembled) as one file at `path`: its model
// tensors, optimizer state, generator state, configs and extra metadata. Consolidates a sharded
// checkpoint when `path` is its own main file (`ultramem consolidate`). Atomic like save_checkpoint.
void save_checkpoint(const std::string& path, const Checkpoint& ckpt);

// Shard files of a sharded checkpoint at `path` (docs/distributed.md) sit next to it as
// "<stem>.step<S>.<token>.rank<r>-of-<W>.safetensors", <stem> being the main file's name without
// ".safetensors". A one-file save (save_checkpoint without `shards`) removes every shard file of its
// stem once the new file is committed: the main file, the only one that references them, no longer does.
std::string checkpoint_stem(const std::string& path);
std::string shard_file_name(const std::string& stem, int64_t step, const std::string& token, int64_t rank,
                            int64_t world);
bool is_shard_file_of(const std::string& stem, const std::string& file_name);
void remove_shard_files(const std::string& path);

// Reads and verifies a checkpoint: file structure (truncation, bad header), format name and version,
// required metadata and the checksum. Throws std::runtime_error naming the file and the problem.
// A sharded checkpoint comes assembled (every split tensor whole), its shard files verified against
// the manifest (name, rank, checksum); a missing, stale or corrupt shard is an error naming the file.
Checkpoint read_checkpoint(const std::string& path);
// The same with tensors cut to columns (see CheckpointReadOptions). Only the shard files that hold
// wanted columns are read. std::runtime_error for a column range outside a tensor or a tensor that is
// not at least two-dimensional.
Checkpoint read_checkpoint(const std::string& path, const CheckpointReadOptions& options);

// Writes one rank's shard file: `tensors` (file names, each a column slice) and `shard_info` (JSON
// object: rank, world, step, ...) as metadata "shard", with format, version and checksum. Atomic like
// save_checkpoint. Returns the checksum ("crc32:...") for the manifest.
std::string save_checkpoint_shard(const std::string& path,
                                  const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                                  const nlohmann::json& shard_info);

// The checkpoint's model tensors as views of a read-only memory mapping of the file (for tables larger
// than RAM): format and version checked, the checksum not (it would read every page); optimizer state
// untouched. Tensors not 64-byte aligned in the file are copied instead; their names ("model." stripped)
// go to *copied. std::runtime_error naming the file for a missing, truncated, corrupt, foreign or
// sharded file.
Checkpoint map_checkpoint(const std::string& path, std::vector<std::string>* copied = nullptr);

// Differences between two flat-or-nested JSON configs as "key: <a> vs <b>" lines, keys as dotted paths
// (nested objects are compared key by key). Empty when equal.
std::vector<std::string> config_differences(const nlohmann::json& a, const nlohmann::json& b);

// Copies the checkpoint's model tensors into `model` (under NoGradGuard). Throws std::runtime_error
// naming the file when the stored model config differs from `model_config` (listing the differing
// keys), or when a parameter/buffer is missing, unexpected or of another shape/dtype.
void load_model_state(const Checkpoint& ckpt, torch::nn::Module& model, const nlohmann::json& model_config);

// Weights only, for evaluation and generation: read_checkpoint + load_model_state. To build the model
// from the stored config first, call read_checkpoint once, construct the model from
// ckpt.model_config (nn::model_config_from_json) and then load_model_state(ckpt, ...).
void load_model_weights(const std::string& path, torch::nn::Module& model, const nlohmann::json& model_config);

// CPU generator state get/set ([S] uint8), for checkpoints.
torch::Tensor get_rng_state();
void set_rng_state(const torch::Tensor& state);

}  // namespace ultramem::checkpoint
