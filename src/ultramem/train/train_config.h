// Training hyperparameters and run settings, with JSON (de)serialisation. Defaults follow the spec's
// section 6 (AdamW betas (0.9, 0.95), weight decay 0.1, clip 1.0, cosine to 0.1x with ~1% warmup,
// value lr multiplier T = 10).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace ultramem::train {

struct TrainConfig {
  // Optimisation.
  double lr = 3e-4;                  // peak learning rate
  double min_lr_ratio = 0.1;         // final lr = min_lr_ratio * lr
  int64_t warmup_steps = -1;         // -1: 1% of steps (at least 1)
  int64_t steps = 1000;              // optimizer steps of the whole run
  int64_t batch_size = 8;            // sequences per micro-batch
  int64_t seq_len = 128;             // tokens per sequence
  int64_t grad_accum = 1;            // micro-batches per optimizer step
  double grad_clip = 1.0;            // max global grad norm; 0 disables clipping
  double weight_decay = 0.1;         // decay group
  double memory_weight_decay = 0.0;  // memory value tables (no_decay group: always 0)
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double value_lr_T = 10.0;          // value lr multiplier at step 0 (>= 1; 1 disables it)
  int64_t value_lr_decay_steps = -1; // steps until the multiplier reaches 1; -1: all steps
  double expert_lr_T = 1.0;          // MoE experts' lr multiplier at step 0, decaying to 1 like the values'
                                     // (an option for fair comparisons; 1: off, the default)
  int64_t expert_lr_decay_steps = -1;  // steps until it reaches 1; -1: all steps
  bool value_sparse_adam = true;     // row-sparse (lazy) AdamW for memory values; false: dense AdamW
  uint64_t seed = 0;                 // torch::manual_seed at the start of a fresh run

  // Evaluation, logging, checkpoints.
  int64_t eval_every = 100;          // steps between evaluations (and one at the end); 0: never
  int64_t eval_batches = 8;          // fixed validation batches (at most) per evaluation
  int64_t log_every = 10;            // steps between progress lines and metrics records; 0: never
  int64_t checkpoint_every = 500;    // steps between checkpoints (one is always written at the end); 0: end only
  bool keep_best = true;             // also write best.safetensors when the val loss improves
  std::string out_dir = "runs/run";  // metrics.jsonl, checkpoint.safetensors, best.safetensors

  int64_t resolved_warmup_steps() const;        // warmup_steps, or max(1, steps / 100) when -1
  int64_t resolved_value_lr_decay_steps() const;  // value_lr_decay_steps, or steps when -1
  int64_t resolved_expert_lr_decay_steps() const;  // expert_lr_decay_steps, or steps when -1
  int64_t tokens_per_step() const { return batch_size * seq_len * grad_accum; }

  // Throws std::invalid_argument("TrainConfig.<field>: ...") for out-of-range values.
  void validate() const;
};

// Same field names. Unknown keys and wrong types throw std::invalid_argument naming the key; missing
// keys keep their defaults. The result is validated.
TrainConfig train_config_from_json(const nlohmann::json& j);
nlohmann::json train_config_to_json(const TrainConfig& c);
TrainConfig load_train_config(const std::string& path);  // std::runtime_error for an unreadable file

// Keys whose change alters the optimisation trajectory; a resumed run must match the checkpoint on
// these (everything except steps, eval/log/checkpoint cadence, keep_best and out_dir).
const std::vector<std::string>& trajectory_keys();

}  // namespace ultramem::train
