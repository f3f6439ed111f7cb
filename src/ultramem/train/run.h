// Run assembly: the one place that turns a model config, training settings and a data source into a
// ready Trainer over an nn::Transformer with its run folder. `ultramem train` and the experiment
// harness both build their runs here.
//
// The run folder (checkpoint/run_folder.h) is self-contained: run.json records the data folder as an
// absolute path and the model and train configs, and the tokenizer of prepared LM data is copied in,
// so that `eval` and `generate` work from any working directory.
#pragma once
#include <cstdint>
#include <functional>
#include <iosfwd>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "ultramem/nn/model_config.h"
#include "ultramem/nn/transformer.h"
#include "ultramem/train/train_config.h"
#include "ultramem/train/trainer.h"

namespace ultramem::data {
class FactTask;
}

namespace ultramem::train {

// A config file: a model config, or {"model": {...}, "train": {...}} ("train" optional).
struct RunConfigFile {
  nlohmann::json model;  // ModelConfig JSON
  nlohmann::json train;  // TrainConfig keys (an empty object when absent)
};
// std::runtime_error naming the file for unreadable or invalid JSON and unknown top-level keys.
RunConfigFile read_run_config(const std::string& path);

// Where the batches come from.
struct RunData {
  std::string task = "lm";   // "lm": prepared corpus (data_dir); "facts": the synthetic fact task
  std::string data_dir;      // task lm: a folder written by `ultramem prepare`
  nlohmann::json facts;      // task facts: data::FactTaskConfig keys
};

// The model's vocab_size for `data`: the prepared tokenizer's, or the fact task's layout.
int64_t data_vocab_size(const RunData& data);

enum class Resume {
  kRefuse,     // a fresh run; an existing checkpoint in out_dir is an error (naming --resume)
  kRequired,   // continue out_dir's checkpoint; its absence is an error
  kIfPresent,  // continue when a checkpoint exists, else start fresh (the experiment harness)
};

struct RunOptions {
  nlohmann::json model;      // complete ModelConfig JSON
  nlohmann::json train;      // TrainConfig JSON; out_dir required
  RunData data;
  Resume resume = Resume::kRefuse;
  int64_t rank = 0, world = 1;  // this process's share of the data (data parallel)
  std::ostream* log = nullptr;  // progress lines (null: silent)
  // Makes the freshly built model one rank of a parallel run (dist/: joins the group, checks that every
  // rank has the same `settings`, shards values) and returns the trainer's context. Null: a single
  // process. settings: {"model": the normalised model config, "train": the train config but out_dir,
  // "data": what identifies the data (the prepared manifest's hashes and counts, or the fact task)}.
  std::function<std::shared_ptr<ParallelContext>(torch::nn::Module&, const nlohmann::json& settings)> parallelize;
  // Extra keys of run.json (e.g. the experiment case's identity).
  nlohmann::json record = nlohmann::json::object();
  bool write_record = true;     // rank 0 writes run.json (other ranks never do)
};

class TrainingRun {
 public:
  // Validates the configs against each other and the data (vocabulary, seq_len, batch split), builds
  // the model, the data, the trainer, and resumes as asked. Throws std::invalid_argument naming the
  // field for inconsistent settings.
  explicit TrainingRun(RunOptions options);
  ~TrainingRun();

  // Trains to the configured steps (or stops after stop_at_step, with a checkpoint). On reaching the
  // last step: evaluates when no evaluation ran, records "final" in run.json and returns true.
  bool run(int64_t stop_at_step = -1);

  const nn::ModelConfig& model_config() const { return model_cfg_; }
  const TrainConfig& train_config() const { return train_cfg_; }
  nn::Transformer& model() { return model_; }
  Trainer& trainer() { return *trainer_; }
  const std::string& checkpoint_path() const { return checkpoint_; }
  // The run record as written (final results under "final" once run() finished).
  const nlohmann::json& record() const { return record_; }
  // Fact task of task "facts" (null for LM data).
  const std::shared_ptr<data::FactTask>& facts() const { return facts_; }
  // Extra results merged into "final" when run() finishes (e.g. fact recall); called with the model.
  std::function<nlohmann::json(nn::Transformer&)> final_extra;

 private:
  RunOptions o_;
  nn::ModelConfig model_cfg_;
  TrainConfig train_cfg_;
  nn::Transformer model_{nullptr};
  std::unique_ptr<Trainer> trainer_;
  std::shared_ptr<data::FactTask> facts_;
  std::string checkpoint_;
  nlohmann::json record_;
  bool lead_ = true;
};

}  // namespace ultramem::train
