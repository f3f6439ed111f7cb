#include "ultramem/train/run.h"

#include <torch/torch.h>

#include <filesystem>
#include <iomanip>
#include <iostream>

#include "ultramem/checkpoint/run_folder.h"
#include "ultramem/data/facts.h"
#include "ultramem/data/prepared.h"
#include "ultramem/data/sampler.h"
#include "ultramem/data/shard.h"
#include "ultramem/io/json_file.h"
#include "ultramem/nn/model_info.h"
#include "ultramem/train/transformer_model.h"

namespace ultramem::train {
namespace {
namespace fs = std::filesystem;
using nlohmann::json;

// Batches of a run: the training source and the fixed evaluation batches.
struct RunBatches {
  BatchSource source;
  std::vector<Batch> eval;
};

RunBatches lm_batches(const data::PreparedData& prepared, const TrainConfig& tc, int64_t rank, int64_t world) {
  RunBatches d;
  auto sampler = std::make_shared<data::BatchSampler>(data::TokenShard::open(prepared.train_path),
                                                      tc.batch_size / world, tc.seq_len, tc.seed, rank, world);
  d.source.next = [sampler] { return sampler->next(); };
  d.source.position = [sampler] { return sampler->position(); };
  d.source.set_position = [sampler](int64_t k) { sampler->set_position(k); };
  const auto val = data::TokenShard::open(prepared.val_path);
  d.eval = data::eval_batches(*val, tc.batch_size, tc.seq_len, tc.eval_batches);
  return d;
}

RunBatches fact_batches(const std::shared_ptr<data::FactTask>& task, const TrainConfig& tc, int64_t rank,
                        int64_t world) {
  if (world != 1) throw std::invalid_argument("the fact task trains in one process (world size 1)");
  RunBatches d;
  auto position = std::make_shared<int64_t>(0);
  const uint64_t stream = tc.seed;  // the training seed picks the data order; the facts stay the same
  d.source.next = [task, position, tc, stream] {
    Batch b;
    task->batch((*position)++, tc.batch_size, tc.seq_len, stream * 2, b.inputs, b.targets);
    return b;
  };
  d.source.position = [position] { return *position; };
  d.source.set_position = [position](int64_t k) { *position = k; };
  for (int64_t i = 0; i < std::max<int64_t>(tc.eval_batches, 1); ++i) {
    Batch b;
    task->batch(i, tc.batch_size, tc.seq_len, /*stream=*/1'000'001, b.inputs, b.targets);
    d.eval.push_back(std::move(b));
  }
  return d;
}

}  // namespace

RunConfigFile read_run_config(const std::string& path) {
  const auto j = io::read_json_file(path);
  if (!j.is_object()) throw std::runtime_error(path + ": expected a JSON object");
  RunConfigFile c;
  c.train = json::object();
  if (j.contains("model")) {
    for (auto it = j.begin(); it != j.end(); ++it)
      if (it.key() != "model" && it.key() != "train")
        throw std::runtime_error(path + ": unknown top-level key \"" + it.key() +
                                 "\" (a config with \"model\" may only have \"model\" and \"train\")");
    c.model = j.at("model");
    if (j.contains("train")) c.train = j.at("train");
    if (!c.model.is_object()) throw std::runtime_error(path + ": model: expected an object, got " + c.model.type_name());
    if (!c.train.is_object()) throw std::runtime_error(path + ": train: expected an object, got " + c.train.type_name());
  } else {
    c.model = j;
  }
  return c;
}

int64_t data_vocab_size(const RunData& data) {
  if (data.task == "facts") return data::fact_task_config_from_json(data.facts).vocab_size();
  if (data.task != "lm") throw std::invalid_argument("task: expected \"lm\" or \"facts\", got \"" + data.task + "\"");
  return data::load_prepared(data.data_dir).vocab_size;
}

TrainingRun::TrainingRun(RunOptions options) : o_(std::move(options)) {
  const int64_t rank = o_.rank, world = o_.world;
  lead_ = rank == 0;
  std::ostream null_out(nullptr);
  std::ostream& out = lead_ && o_.log ? *o_.log : null_out;
  model_cfg_ = nn::model_config_from_json(o_.model);
  train_cfg_ = train_config_from_json(o_.train);
  const auto& tc = train_cfg_;
  if (tc.batch_size % world != 0)
    throw std::invalid_argument("batch_size " + std::to_string(tc.batch_size) +
                                " (the global batch) is not divisible by the " + std::to_string(world) + " ranks");
  if (tc.seq_len > model_cfg_.max_seq_len)
    throw std::invalid_argument("seq_len " + std::to_string(tc.seq_len) + " exceeds the model's max_seq_len " +
                                std::to_string(model_cfg_.max_seq_len) +
                                " (lower --seq-len, or raise max_seq_len in the model config)");

  // Data first: a vocabulary mismatch is cheaper to report than after building the model.
  std::optional<data::PreparedData> prepared;
  if (o_.data.task == "facts") {
    facts_ = std::make_shared<data::FactTask>(data::fact_task_config_from_json(o_.data.facts));
    if (facts_->config().vocab_size() != model_cfg_.vocab_size)
      throw std::invalid_argument("the model's vocab_size " + std::to_string(model_cfg_.vocab_size) +
                                  " differs from the fact task's " + std::to_string(facts_->config().vocab_size()));
  } else if (o_.data.task == "lm") {
    prepared = data::load_prepared(o_.data.data_dir);
    if (prepared->vocab_size != model_cfg_.vocab_size)
      throw std::invalid_argument("the model's vocab_size " + std::to_string(model_cfg_.vocab_size) +
                                  " differs from the tokenizer's " + std::to_string(prepared->vocab_size) + " in " +
                                  o_.data.data_dir + " (prepare with --vocab " + std::to_string(model_cfg_.vocab_size) +
                                  ", or set vocab_size " + std::to_string(prepared->vocab_size) +
                                  " in the model config)");
  } else {
    throw std::invalid_argument("task: expected \"lm\" or \"facts\", got \"" + o_.data.task + "\"");
  }

  const auto info = nn::model_info(model_cfg_);
  nn::check_fits_in_memory("training " + model_cfg_.name + " at batch " + std::to_string(tc.batch_size) + " x " +
                               std::to_string(tc.seq_len) + " tokens",
                           nn::training_memory(model_cfg_, info, tc.batch_size, tc.seq_len));

  fs::create_directories(tc.out_dir);
  checkpoint_ = (fs::path(tc.out_dir) / "checkpoint.safetensors").string();
  const bool have_ckpt = fs::exists(checkpoint_);
  if (o_.resume == Resume::kRefuse && have_ckpt)
    throw std::invalid_argument(checkpoint_ + " exists: pass --resume to continue it, or --out another folder");
  if (o_.resume == Resume::kRequired && !have_ckpt)
    throw std::invalid_argument("--resume: no checkpoint at " + checkpoint_);

  out << "model " << model_cfg_.name << ": " << info.params_total << " parameters, " << info.params_activated
      << " activated, " << std::setprecision(4) << info.flops_per_token / 1e6 << " MFLOP/token forward" << std::endl;
  if (prepared)
    out << "data " << prepared->dir << ": " << prepared->train.tokens << " train tokens, " << prepared->val.tokens
        << " val tokens; " << tc.tokens_per_step() << " tokens/step x " << tc.steps << " steps" << std::endl;

  torch::manual_seed(tc.seed);  // model init is seeded by the config; this covers anything else
  model_ = nn::Transformer(model_cfg_);
  auto trainable = as_trainable(model_);
  std::shared_ptr<ParallelContext> parallel;
  if (o_.parallelize) {
    nlohmann::json settings = {{"model", nn::model_config_to_json(model_cfg_)}, {"train", train_config_to_json(tc)}};
    settings["train"].erase("out_dir");  // each machine may write its own folder
    if (prepared)
      settings["data"] = {{"tokenizer_fnv1a64", prepared->tokenizer_hash}, {"input_fingerprint", prepared->input_fingerprint},
                          {"train_tokens", prepared->train.tokens}, {"val_tokens", prepared->val.tokens},
                          {"seed", prepared->seed}, {"val_fraction", prepared->val_fraction}};
    else
      settings["data"] = {{"facts", o_.data.facts}};
    parallel = o_.parallelize(*model_, settings);
  }
  RunBatches batches = facts_ ? fact_batches(facts_, tc, rank, world) : lm_batches(*prepared, tc, rank, world);
  trainer_ = std::make_unique<Trainer>(trainable, tc, batches.source, std::move(batches.eval),
                                       lead_ ? o_.log : nullptr, parallel);
  if (have_ckpt && o_.resume != Resume::kRefuse) {
    trainer_->resume(checkpoint_);
    out << "resumed " << checkpoint_ << " at step " << trainer_->state().step << std::endl;
  }

  // The run folder: run.json with absolute paths, the model and train configs; the tokenizer beside
  // the checkpoint.
  record_ = o_.record;
  record_["out_dir"] = fs::absolute(tc.out_dir).lexically_normal().string();
  record_["task"] = o_.data.task;
  if (prepared) record_["data_dir"] = fs::absolute(prepared->dir).lexically_normal().string();
  if (facts_) record_["facts"] = o_.data.facts;
  record_["model"] = nn::model_config_to_json(model_cfg_);
  record_["train"] = train_config_to_json(tc);
  if (lead_ && o_.write_record) {
    io::write_json_file(checkpoint::run_record_path(tc.out_dir), record_);
    if (prepared) {
      const auto tok = fs::path(tc.out_dir) / checkpoint::kRunTokenizerFile;
      fs::copy_file(prepared->tokenizer_path, tok, fs::copy_options::overwrite_existing);
    }
  }
}

TrainingRun::~TrainingRun() = default;

bool TrainingRun::run(int64_t stop_at_step) {
  const auto& st = trainer_->run(stop_at_step);
  if (st.step < train_cfg_.steps) return false;
  const double val = st.has_val_loss ? st.last_val_loss : trainer_->evaluate();
  json final = {{"step", st.step},           {"val_loss", val},          {"best_val_loss", st.best_val_loss},
                {"best_step", st.best_step}, {"tokens", st.tokens_seen}, {"train_seconds", st.train_seconds}};
  if (final_extra) final.update(final_extra(model_));
  record_["final"] = final;
  if (lead_ && o_.write_record) io::write_json_file(checkpoint::run_record_path(train_cfg_.out_dir), record_);
  return true;
}

}  // namespace ultramem::train
