// `ultramem train CONFIG`: trains a language model on prepared data (train/trainer.h), resumable.
#include <CLI/CLI.hpp>
#include <torch/torch.h>

#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <memory>

#include "commands.h"
#include "dist_options.h"
#include "run_files.h"
#include "ultramem/data/prepared.h"
#include "ultramem/data/sampler.h"
#include "ultramem/data/shard.h"
#include "ultramem/dist/data_parallel.h"
#include "ultramem/dist/memory_sharding.h"
#include "ultramem/dist/process_group.h"
#include "ultramem/nn/model_config.h"
#include "ultramem/nn/model_info.h"
#include "ultramem/nn/transformer.h"
#include "ultramem/train/train_config.h"
#include "ultramem/train/trainer.h"
#include "ultramem/train/transformer_model.h"

namespace ultramem::cli {
namespace {
namespace fs = std::filesystem;

struct TrainArgs {
  std::string config;
  std::string data_dir = kDefaultDataDir;
  std::string out_dir;
  std::string train_config;
  std::vector<std::string> sets;
  std::vector<std::string> compare;
  bool resume = false;
  int64_t stop_at = -1;
  // Shortcuts for common TrainConfig keys (applied only when given).
  int64_t steps = 0, batch_size = 0, seq_len = 0, grad_accum = 0, eval_every = -1, log_every = -1;
  double lr = 0;
  int64_t seed = -1;
  DistArgs dist;
};

// "key=value": value parsed as JSON when it is JSON (numbers, true/false), else as a string.
void apply_set(nlohmann::json& train, const std::string& kv) {
  const auto eq = kv.find('=');
  if (eq == std::string::npos || eq == 0) throw std::invalid_argument("--set expects KEY=VALUE, got \"" + kv + "\"");
  const std::string key = kv.substr(0, eq), value = kv.substr(eq + 1);
  try {
    train[key] = nlohmann::json::parse(value);
  } catch (const nlohmann::json::parse_error&) {
    train[key] = value;
  }
}

train::Batch to_train_batch(data::Batch b) { return {std::move(b.inputs), std::move(b.targets)}; }

// Final validation loss recorded in another run's record, if any.
void print_comparison(const std::string& own_dir, const nlohmann::json& own, const std::vector<std::string>& dirs) {
  std::cout << "\n" << std::left << std::setw(28) << "run" << std::setw(10) << "steps" << std::setw(12)
            << "val_loss" << "\n";
  auto row = [](const std::string& name, const nlohmann::json& f) {
    std::cout << std::left << std::setw(28) << name << std::setw(10) << f.value("step", int64_t(0))
              << std::setw(12) << std::fixed << std::setprecision(4) << f.value("val_loss", 0.0) << "\n";
  };
  row(own_dir, own);
  for (const auto& d : dirs) {
    const auto rec = run_record_path(d);
    if (!fs::exists(rec)) {
      std::cout << std::left << std::setw(28) << d << "(not trained yet: no " << rec << ")\n";
      continue;
    }
    const auto j = read_json_file(rec);
    if (!j.contains("final")) {
      std::cout << std::left << std::setw(28) << d << "(no finished training recorded)\n";
      continue;
    }
    row(d, j["final"]);
  }
  std::cout << std::flush;
}

// Trains in this process: alone, or as one rank of the run `rdv` describes (data parallel, memory values
// sharded by columns; only rank 0 prints and writes run.json and metrics). The rank joins the others
// once its configuration and data are checked.
void train_process(const TrainArgs& a, const dist::RendezvousConfig& rdv) {
  const int64_t rank = rdv.rank, world = rdv.world_size;
  const bool lead = rank == 0;
  std::ostream null_out(nullptr);
  std::ostream& out = lead ? std::cout : null_out;
  auto file = read_config_file(a.config);
  const auto model_cfg = nn::model_config_from_json(file.model);
  nlohmann::json tj = file.train;
  if (!a.train_config.empty()) tj.update(read_json_file(a.train_config));
  for (const auto& kv : a.sets) apply_set(tj, kv);
  if (a.steps > 0) tj["steps"] = a.steps;
  if (a.batch_size > 0) tj["batch_size"] = a.batch_size;
  if (a.seq_len > 0) tj["seq_len"] = a.seq_len;
  if (a.grad_accum > 0) tj["grad_accum"] = a.grad_accum;
  if (a.eval_every >= 0) tj["eval_every"] = a.eval_every;
  if (a.log_every >= 0) tj["log_every"] = a.log_every;
  if (a.lr > 0) tj["lr"] = a.lr;
  if (a.seed >= 0) tj["seed"] = a.seed;
  tj["out_dir"] = !a.out_dir.empty() ? a.out_dir : (tj.contains("out_dir") ? tj["out_dir"].get<std::string>()
                                                                           : "runs/" + model_cfg.name);
  const auto tcfg = train::train_config_from_json(tj);
  if (tcfg.batch_size % world != 0)
    throw std::invalid_argument("batch_size " + std::to_string(tcfg.batch_size) + " (the global batch) is not divisible by the " +
                                std::to_string(world) + " ranks");
  if (tcfg.seq_len > model_cfg.max_seq_len)
    throw std::invalid_argument("seq_len " + std::to_string(tcfg.seq_len) + " exceeds the model's max_seq_len " +
                                std::to_string(model_cfg.max_seq_len));

  const auto prepared = data::load_prepared(a.data_dir);
  if (prepared.vocab_size != model_cfg.vocab_size)
    throw std::invalid_argument("the model's vocab_size " + std::to_string(model_cfg.vocab_size) +
                                " differs from the tokenizer's " + std::to_string(prepared.vocab_size) + " in " +
                                a.data_dir + " (prepare with --vocab " + std::to_string(model_cfg.vocab_size) +
                                " or edit the config)");
  fs::create_directories(tcfg.out_dir);
  const std::string ckpt = (fs::path(tcfg.out_dir) / "checkpoint.safetensors").string();
  if (!a.resume && fs::exists(ckpt))
    throw std::invalid_argument(ckpt + " exists: pass --resume to continue it, or --out another folder");

  const auto info = nn::model_info(model_cfg);
  out << "model " << model_cfg.name << ": " << info.params_total << " parameters, "
            << info.params_activated << " activated, " << std::setprecision(4) << info.flops_per_token / 1e6
            << " MFLOP/token forward" << std::endl;
  out << "data " << prepared.dir << ": " << prepared.train.tokens << " train tokens, " << prepared.val.tokens
            << " val tokens; " << tcfg.tokens_per_step() << " tokens/step x " << tcfg.steps << " steps"
            << std::endl;

  torch::manual_seed(tcfg.seed);  // model init is seeded by the config; this covers anything else
  auto model = train::as_trainable(nn::Transformer(model_cfg));
  std::shared_ptr<dist::Group> group;
  std::shared_ptr<dist::DataParallel> parallel;
  if (rdv.distributed()) {
    group = dist::Group::join(rdv);
    auto sharded = dist::shard_memory_values(model->module(), group);
    parallel = std::make_shared<dist::DataParallel>(group, sharded);
    out << "distributed: " << world << " ranks, " << tcfg.batch_size / world << " sequences per rank and micro-batch, "
        << sharded.size() << " memory value tables sharded by columns (" << group->timeout_seconds()
        << " s timeout)" << std::endl;
  }
  auto train_shard = data::TokenShard::open(prepared.train_path);
  auto val_shard = data::TokenShard::open(prepared.val_path);
  auto sampler = std::make_shared<data::BatchSampler>(train_shard, tcfg.batch_size / world, tcfg.seq_len, tcfg.seed,
                                                      rank, world);
  train::BatchSource source;
  source.next = [sampler] { return to_train_batch(sampler->next()); };
  source.position = [sampler] { return sampler->position(); };
  source.set_position = [sampler](int64_t k) { sampler->set_position(k); };
  std::vector<train::Batch> eval;
  for (auto& b : data::eval_batches(*val_shard, tcfg.batch_size, tcfg.seq_len, tcfg.eval_batches))
    eval.push_back(to_train_batch(std::move(b)));

  nlohmann::json record = {{"config", a.config}, {"data_dir", prepared.dir}, {"out_dir", tcfg.out_dir},
                           {"model", nn::model_config_to_json(model_cfg)},
                           {"train", train::train_config_to_json(tcfg)}};
  train::Trainer trainer(model, tcfg, source, std::move(eval), lead ? &std::cout : nullptr, parallel);
  if (a.resume) {
    if (!fs::exists(ckpt)) throw std::invalid_argument("--resume: no checkpoint at " + ckpt);
    trainer.resume(ckpt);
    out << "resumed " << ckpt << " at step " << trainer.state().step << std::endl;
  }
  if (lead) write_json_file(run_record_path(tcfg.out_dir), record);
  const auto& st = trainer.run(a.stop_at);
  if (st.step < tcfg.steps) {
    out << "stopped at step " << st.step << " of " << tcfg.steps << "; continue with --resume" << std::endl;
    if (group) group->barrier("end of training");
    return;
  }
  const double val = st.has_val_loss ? st.last_val_loss : trainer.evaluate();
  record["final"] = {{"step", st.step}, {"val_loss", val}, {"best_val_loss", st.best_val_loss},
                     {"best_step", st.best_step}, {"tokens", st.tokens_seen}, {"train_seconds", st.train_seconds}};
  if (group) group->barrier("end of training");
  if (!lead) return;
  write_json_file(run_record_path(tcfg.out_dir), record);
  std::cout << "final: step " << st.step << ", val loss " << std::fixed << std::setprecision(4) << val
            << " (perplexity " << std::setprecision(1) << std::exp(val) << "), checkpoint " << ckpt << std::endl;
  if (!a.compare.empty()) print_comparison(tcfg.out_dir, record["final"], a.compare);
}

void run_train(const TrainArgs& a) {
  if (const int code = launch_if_requested(a.dist); code >= 0) {
    if (code == 0) return;
    std::cout.flush();
    std::exit(code);
  }
  const auto rdv = resolve_rank(a.dist);
  if (!rdv.distributed()) {
    train_process(a, rdv);
    return;
  }
  // A rank: any error ends this process at once with a message naming the rank. _exit skips
  // destructors, which could wait on peers that are gone.
  try {
    train_process(a, rdv);
  } catch (const std::exception& e) {
    const std::string who = "rank " + std::to_string(rdv.rank) + " of " + std::to_string(rdv.world_size);
    const std::string msg = e.what();
    std::cerr << "ultramem: error: " << (msg.find(who) == std::string::npos ? who + ": " : "") << msg << std::endl;
    std::cout.flush();
    ::_exit(1);
  }
}

}  // namespace

void add_train_command(CLI::App& app) {
  auto a = std::make_shared<TrainArgs>();
  auto* cmd = app.add_subcommand(
      "train",
      "Train a language model (config: a model config JSON, or {\"model\": ..., \"train\": ...}) on "
      "prepared data. Writes metrics.jsonl, checkpoint.safetensors and run.json to the output folder.");
  cmd->add_option("config", a->config, "Config file (JSON)")->required()->check(CLI::ExistingFile);
  cmd->add_option("--data", a->data_dir, "Prepared data folder (from `ultramem prepare`)")->capture_default_str();
  cmd->add_option("--out", a->out_dir, "Output folder (default runs/<model name>)");
  cmd->add_option("--train-config", a->train_config, "JSON file of training settings (TrainConfig keys)");
  cmd->add_option("--set", a->sets, "Override a training setting: KEY=VALUE (repeatable)");
  cmd->add_option("--steps", a->steps, "Optimizer steps");
  cmd->add_option("--batch-size", a->batch_size, "Sequences per micro-batch (with several ranks: the global batch, split between them)");
  cmd->add_option("--seq-len", a->seq_len, "Tokens per sequence");
  cmd->add_option("--grad-accum", a->grad_accum, "Micro-batches per optimizer step");
  cmd->add_option("--lr", a->lr, "Peak learning rate");
  cmd->add_option("--eval-every", a->eval_every, "Steps between evaluations (0: only at the end)");
  cmd->add_option("--log-every", a->log_every, "Steps between progress lines");
  cmd->add_option("--seed", a->seed, "Training seed (data order)");
  cmd->add_flag("--resume", a->resume, "Continue from the output folder's checkpoint");
  cmd->add_option("--stop-at", a->stop_at, "Stop (with a checkpoint) after this step; resume later");
  cmd->add_option("--compare", a->compare, "Run folders whose final validation loss to print next to this one");
  add_dist_options(cmd, a->dist);
  cmd->callback([a] { run_train(*a); });
}

}  // namespace ultramem::cli
