// Training checkpoints: one safetensors file holding the model's parameters and buffers
// ("model.<name>", readable from Python), the optimizer state ("optim.<param name>.exp_avg", ...,
// "optim.step"), the CPU random generator state ("rng.cpu") and string metadata: format, format
// version, model config, train config and trainer state (JSON) and a CRC-32 checksum. Written
// atomically (io::save_safetensors: temporary file, fsync, rename), so a crash mid-write leaves the
// previous checkpoint intact. Format details: docs/training.md.
#pragma once
#include <torch/nn/module.h>
#include <torch/types.h>

#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace ultramem::train {

class AdamW;

inline constexpr const char* kCheckpointFormat = "ultramem-checkpoint";
inline constexpr int kCheckpointVersion = 1;

// Everything a checkpoint holds, as read back.
struct Checkpoint {
  std::string path;
  nlohmann::json model_config;                  // as written by the model's config_json()
  nlohmann::json train_config;                  // null when written without one
  nlohmann::json trainer_state;                 // null when written without one
  std::map<std::string, torch::Tensor> model;   // parameter/buffer name -> tensor ("model." stripped)
  std::map<std::string, torch::Tensor> optim;   // optimizer state ("optim." stripped; empty if none)
  torch::Tensor rng;                            // [S] uint8 CPU generator state; undefined if none
};

struct CheckpointWriteOptions {
  const AdamW* optimizer = nullptr;             // optimizer state to include (none when null)
  nlohmann::json train_config;                  // stored when not null
  nlohmann::json trainer_state;                 // stored when not null
  bool rng = true;                              // include the CPU generator state
};

// Writes `model`'s parameters and buffers with `model_config` and the optional parts. Throws
// std::runtime_error naming the file on failure (the previous file at `path`, if any, is kept).
void save_checkpoint(const std::string& path, const torch::nn::Module& model,
                     const nlohmann::json& model_config, const CheckpointWriteOptions& options = {});

// Reads and verifies a checkpoint: file structure (truncation, bad header), format name and version,
// required metadata and the checksum. Throws std::runtime_error naming the file and the problem.
Checkpoint read_checkpoint(const std::string& path);

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

}  // namespace ultramem::train
