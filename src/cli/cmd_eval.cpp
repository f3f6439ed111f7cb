// `ultramem eval CHECKPOINT`: validation loss, perplexity, bits per byte, memory-layer statistics.
#include <CLI/CLI.hpp>
#include <torch/torch.h>

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <iostream>
#include <memory>

#include "commands.h"
#include "model_loading.h"
#include "run_files.h"
#include "ultramem/data/prepared.h"
#include "ultramem/data/sampler.h"
#include "ultramem/data/shard.h"

namespace ultramem::cli {
namespace {

struct EvalArgs {
  std::string checkpoint;
  std::string data_dir;
  int64_t batch_size = 8;
  int64_t seq_len = 0;
  int64_t max_batches = 0;
  bool mmap = false;
};

double peak_rss_mib() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_maxrss / 1024.0;  // ru_maxrss is in KiB on Linux
}

void run_eval(const EvalArgs& a) {
  const auto t0 = std::chrono::steady_clock::now();
  auto loaded = load_for_inference(a.checkpoint, a.mmap);
  auto& model = loaded.model;
  const auto& cfg = model->config();
  const auto data_dir = data_dir_for_checkpoint(a.checkpoint, a.data_dir);
  const auto prepared = data::load_prepared(data_dir);
  if (prepared.vocab_size != cfg.vocab_size)
    throw std::invalid_argument("the checkpoint's vocab_size " + std::to_string(cfg.vocab_size) +
                                " differs from the tokenizer's in " + data_dir);
  const int64_t seq_len = a.seq_len > 0 ? a.seq_len : cfg.max_seq_len;
  if (seq_len > cfg.max_seq_len)
    throw std::invalid_argument("--seq-len " + std::to_string(seq_len) + " exceeds max_seq_len " +
                                std::to_string(cfg.max_seq_len));
  auto val = data::TokenShard::open(prepared.val_path);
  const auto batches = data::eval_batches(*val, a.batch_size, seq_len, a.max_batches);
  if (batches.empty())
    throw std::runtime_error(prepared.val_path + ": too short for one batch of " + std::to_string(a.batch_size) +
                             " x " + std::to_string(seq_len) + " tokens; lower --batch-size or --seq-len");
  torch::NoGradGuard no_grad;
  const bool progress = ::isatty(2);  // a live counter on a terminal only
  double nll = 0;
  int64_t tokens = 0;
  std::vector<double> batch_ms;  // per batch: the first one pays the first touch of the value tables
  for (size_t i = 0; i < batches.size(); ++i) {
    const auto& b = batches[i];
    const auto tb = std::chrono::steady_clock::now();
    const auto logits = model->forward(b.inputs);
    batch_ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - tb).count());
    nll += torch::nn::functional::cross_entropy(
               logits.reshape({-1, logits.size(-1)}), b.targets.reshape(-1),
               torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum))
               .item<double>();
    tokens += b.targets.numel();
    if (progress) std::cerr << "\reval batch " << (i + 1) << "/" << batches.size() << std::flush;
  }
  if (progress) std::cerr << "\n";
  const double loss = nll / tokens;
  std::vector<double> later(batch_ms.begin() + 1, batch_ms.end());
  std::sort(later.begin(), later.end());
  // Bits per byte: nats/token -> bits/token, times the split's tokens per UTF-8 byte.
  const double bpb = loss / std::log(2.0) * double(prepared.val.tokens) / double(prepared.val.bytes);
  nlohmann::json out = {{"checkpoint", a.checkpoint},
                        {"data_dir", prepared.dir},
                        {"tokens", tokens},
                        {"val_loss", loss},
                        {"perplexity", std::exp(loss)},
                        {"bits_per_byte", bpb},
                        {"value_format", nn::to_string(loaded.value_format)},
                        {"value_mib", double(loaded.value_bytes) / double(1 << 20)},
                        {"mmap", a.mmap},
                        {"first_batch_ms", batch_ms.front()},
                        {"median_later_batch_ms", later.empty() ? nlohmann::json(nullptr) : nlohmann::json(later[later.size() / 2])},
                        {"peak_rss_mib", peak_rss_mib()},
                        {"seconds", std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()},
                        {"memory_layers", model->telemetry()}};
  std::cout << out.dump(2) << std::endl;
}

}  // namespace

void add_eval_command(CLI::App& app) {
  auto a = std::make_shared<EvalArgs>();
  auto* cmd = app.add_subcommand(
      "eval", "Evaluate a checkpoint (float32, bf16 or int8 value tables) on the validation split: loss, perplexity, bits per byte (nats/token "
              "scaled by the split's tokens per byte), memory-layer usage (coverage, KL to uniform, scores) "
              "and peak memory");
  cmd->add_option("checkpoint", a->checkpoint, "Checkpoint file (.safetensors)")->required()->check(CLI::ExistingFile);
  cmd->add_option("--data", a->data_dir, "Prepared data folder (default: the one the run was trained on)");
  cmd->add_option("--batch-size", a->batch_size, "Sequences per batch")->capture_default_str();
  cmd->add_option("--seq-len", a->seq_len, "Tokens per sequence (0 = the model's max_seq_len)")->capture_default_str();
  cmd->add_option("--max-batches", a->max_batches, "Evaluate at most this many batches (0 = the whole split)")
      ->capture_default_str();
  cmd->add_flag("--mmap", a->mmap,
                "Serve the memory value tables from a read-only mapping of the checkpoint file instead of "
                "loading them (tables larger than RAM; checksum not verified). first_batch_ms vs "
                "median_later_batch_ms shows the first-touch cost");
  cmd->callback([a] { run_eval(*a); });
}

}  // namespace ultramem::cli
