// `ultramem train CONFIG`: flags -> dist::run_train_job (dist/train_job.h; the run is built by
// train/run.h).
#include <CLI/CLI.hpp>

#include <cmath>
#include <cstdlib>
#include <optional>
#include <stdexcept>
#include <iostream>
#include <memory>

#include "commands.h"
#include "dist_options.h"
#include "ultramem/checkpoint/run_folder.h"
#include "ultramem/dist/train_job.h"

namespace ultramem::cli {
namespace {

struct TrainArgs {
  dist::TrainJob job;
  // Shortcuts for common TrainConfig keys: each given one becomes an override as it is, so it meets the
  // config's own validation (--steps 0 is refused, not replaced by the default).
  std::optional<int64_t> steps, batch_size, seq_len, grad_accum, eval_every, log_every, seed;
  std::optional<double> lr;
};

void run_train(TrainArgs a) {
  auto& o = a.job.overrides;
  auto put = [&o](const char* key, const auto& v) {
    if (v) o[key] = *v;
  };
  put("steps", a.steps);
  put("batch_size", a.batch_size);
  put("seq_len", a.seq_len);
  put("grad_accum", a.grad_accum);
  put("eval_every", a.eval_every);
  put("log_every", a.log_every);
  put("seed", a.seed);
  if (a.lr && !std::isfinite(*a.lr))  // JSON has no NaN or infinity to carry it to the config
    throw std::invalid_argument("--lr: must be finite and > 0, got " + std::to_string(*a.lr));
  put("lr", a.lr);
  if (const int code = dist::run_train_job(a.job); code != 0) {
    std::cout.flush();
    std::exit(code);
  }
}

}  // namespace

void add_train_command(CLI::App& app) {
  auto a = std::make_shared<TrainArgs>();
  a->job.data_dir = checkpoint::kDefaultDataDir;
  auto& j = a->job;
  auto* cmd = app.add_subcommand(
      "train",
      "Train a language model (config: a model config JSON, or {\"model\": ..., \"train\": ...}) on "
      "prepared data. Writes metrics.jsonl, checkpoint.safetensors, run.json and the tokenizer to the output folder.");
  cmd->add_option("config", j.config, "Config file (JSON)")->required()->check(CLI::ExistingFile);
  cmd->add_option("--data", j.data_dir, "Prepared data folder (from `ultramem prepare`)")->capture_default_str();
  cmd->add_option("--out", j.out_dir, "Output folder (default runs/<model name>)");
  cmd->add_option("--train-config", j.train_config, "JSON file of training settings (TrainConfig keys)");
  cmd->add_option("--set", j.sets, "Override a training setting: KEY=VALUE (repeatable)");
  cmd->add_option("--steps", a->steps, "Optimizer steps");
  cmd->add_option("--batch-size", a->batch_size,
                  "Sequences per micro-batch (with several ranks: the global batch, split between them)");
  cmd->add_option("--seq-len", a->seq_len, "Tokens per sequence");
  cmd->add_option("--grad-accum", a->grad_accum, "Micro-batches per optimizer step");
  cmd->add_option("--lr", a->lr, "Peak learning rate");
  cmd->add_option("--eval-every", a->eval_every, "Steps between evaluations (0: only at the end)");
  cmd->add_option("--log-every", a->log_every, "Steps between progress lines");
  cmd->add_option("--seed", a->seed, "Training seed (data order)");
  cmd->add_flag("--resume", j.resume, "Continue from the output folder's checkpoint");
  cmd->add_option("--stop-at", j.stop_at, "Stop (with a checkpoint) after this step; resume later")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--compare", j.compare, "Run folders whose final validation loss to print next to this one");
  add_dist_options(cmd, j.launch);
  cmd->callback([a] { run_train(*a); });
}

}  // namespace ultramem::cli
