// The training loop: micro-batches with gradient accumulation, LM cross-entropy plus the model's
// auxiliary losses, global-norm clipping, AdamW with the cosine schedule and the value lr multiplier,
// progress lines, metrics (JSON lines), periodic evaluation and checkpoints, exact resume.
// The model is seen only through TrainableModel (the Transformer API); batches through BatchSource.
#pragma once
#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <iosfwd>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "ultramem/train/batch_source.h"
#include "ultramem/train/model.h"
#include "ultramem/train/optimizer.h"
#include "ultramem/train/parallel.h"
#include "ultramem/train/schedule.h"
#include "ultramem/train/train_config.h"

namespace ultramem::train {

// Progress of a run; stored in checkpoints as JSON ("trainer_state").
struct TrainerState {
  int64_t step = 0;             // optimizer steps done
  int64_t tokens_seen = 0;      // training tokens consumed (inputs, all micro-batches)
  int64_t data_position = -1;   // BatchSource::position() after the last step; -1 when unknown
  bool has_val_loss = false;    // an evaluation has run
  double last_val_loss = 0;     // val loss of the last evaluation
  double best_val_loss = 0;     // lowest val loss so far
  int64_t best_step = -1;       // step of best_val_loss
  double train_seconds = 0;     // wall time spent in training steps, all sessions
};
nlohmann::json trainer_state_to_json(const TrainerState& s);
TrainerState trainer_state_from_json(const nlohmann::json& j);  // std::runtime_error on a bad field

// What one optimizer step did.
struct StepStats {
  int64_t step = 0;                    // 1-based: steps done after this one
  double loss = 0;                     // ce + sum(aux), mean over micro-batches
  double ce = 0;                       // LM cross-entropy, mean over micro-batches
  std::map<std::string, double> aux;   // each auxiliary loss, mean over micro-batches
  double lr = 0;                       // scheduled base lr of this step
  double value_lr_mult = 1;            // multiplier of the memory-value group
  double grad_norm = 0;                // global grad norm before clipping
  double seconds = 0;                  // wall time of the step
  double update_seconds = 0;           // of which clipping + optimizer step + after_optimizer_step
};

class Trainer {
 public:
  // Validates `cfg`, builds the AdamW groups from model->param_groups() (decay: weight_decay,
  // no_decay: 0, memory_values: memory_weight_decay, row-sparse when value_sparse_adam) with names from
  // model->module().named_parameters(), and seeds torch (torch::manual_seed(cfg.seed)). Throws
  // std::invalid_argument for a bad config, a batch source without next(), or parameter groups that
  // do not cover every trainable parameter exactly once. `eval`: fixed validation batches (the first
  // cfg.eval_batches are used). `log`: progress lines (nullptr: silent).
  //
  // `parallel` (optional) makes this trainer one rank of a data-parallel run (train/parallel.h): `train`
  // then yields this rank's share of each global batch (cfg.batch_size / world rows), `eval` the same
  // batches on every rank. Losses, token counts and the grad norm are global; gradients are
  // synchronised before clipping; only rank 0 writes metrics.jsonl and progress lines; checkpoints go
  // through the context. Rank r > 0 seeds torch with seed + r * 0x9E3779B97F4A7C15 (own dropout masks).
  Trainer(std::shared_ptr<TrainableModel> model, TrainConfig cfg, BatchSource train,
          std::vector<Batch> eval = {}, std::ostream* log = nullptr,
          std::shared_ptr<ParallelContext> parallel = nullptr);

  // Restores a checkpoint written by this trainer: weights and buffers, optimizer state and step
  // count, CPU RNG state, trainer state, data position (through BatchSource::set_position). Throws
  // std::runtime_error naming the file for a bad file, another model config (listing the keys), no
  // optimizer state (a weights-only file), and std::invalid_argument when the stored train config
  // differs on a trajectory key (train_config.h). Continuing then reproduces the uninterrupted run
  // bit for bit (given the same batches for the same positions and the same thread count).
  void resume(const std::string& checkpoint_path);

  // Trains from state().step to cfg.steps, or only up to `stop_at_step` when 0 < stop_at_step <
  // cfg.steps (a checkpoint is written there, so a later resume continues). Evaluates every
  // eval_every steps and at the end, checkpoints every checkpoint_every steps and at the end, logs every
  // log_every steps. Writes out_dir/metrics.jsonl (truncated on a fresh run, appended on a resumed
  // one). Throws std::runtime_error when the loss becomes non-finite (before updating the weights).
  const TrainerState& run(int64_t stop_at_step = -1);

  // One optimizer step (grad_accum micro-batches); advances the state. No logging/eval/checkpoint.
  StepStats train_step();

  // Mean LM cross-entropy over the fixed validation batches (eval mode, no grad); NaN without any.
  double evaluate();

  // Full checkpoint (model, optimizer, RNG, train config, trainer state) to `path`, atomically.
  void save_checkpoint(const std::string& path);

  const TrainerState& state() const { return state_; }
  const TrainConfig& config() const { return cfg_; }
  AdamW& optimizer() { return *opt_; }
  TrainableModel& model() { return *model_; }

  // Optional hook called after every step of run() with that step's statistics.
  std::function<void(const StepStats&)> on_step;

 private:
  void write_metrics(const nlohmann::json& record);
  void write_checkpoint(const std::string& path, const checkpoint::CheckpointWriteOptions& options);
  bool lead() const { return !parallel_ || parallel_->rank() == 0; }  // logs and writes metrics
  void log_progress(const StepStats& s, double window_loss, double tokens_per_s, double step_seconds);

  std::shared_ptr<TrainableModel> model_;
  std::shared_ptr<ParallelContext> parallel_;  // null: a single process
  TrainConfig cfg_;
  BatchSource source_;
  std::vector<Batch> eval_;
  std::ostream* log_;
  std::unique_ptr<AdamW> opt_;
  std::vector<torch::Tensor> all_params_;  // every parameter of every group (clipping)
  CosineSchedule schedule_;
  ValueLrMultiplier value_mult_;
  ValueLrMultiplier expert_mult_;  // the MoE experts' multiplier (expert_lr_T; 1 when off)
  TrainerState state_;
  bool resumed_ = false;
  std::string metrics_path_;
};

}  // namespace ultramem::train
