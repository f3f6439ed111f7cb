// `ultramem generate CHECKPOINT --prompt TEXT`: KV-cache sampling, streamed as it is produced.
#include <CLI/CLI.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <iostream>
#include <memory>
#include <numeric>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "model_loading.h"
#include "run_files.h"
#include "ultramem/data/prepared.h"
#include "ultramem/data/tokenizer.h"
#include "ultramem/infer/sampling.h"
#include "ultramem/nn/memory_config.h"

namespace ultramem::cli {
namespace {

struct GenerateArgs {
  std::string checkpoint;
  std::string data_dir;
  std::string prompt;
  infer::SamplingOptions sampling;
  bool mmap = false;
};

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

void run_generate(const GenerateArgs& a) {
  a.sampling.validate();
  auto loaded = load_for_inference(a.checkpoint, a.mmap);
  auto& model = loaded.model;
  const auto prepared = data::load_prepared(data_dir_for_checkpoint(a.checkpoint, a.data_dir));
  const auto tok = data::Tokenizer::load(prepared.tokenizer_path);
  if (tok.vocab_size() != model->config().vocab_size)
    throw std::invalid_argument("the tokenizer's vocabulary (" + std::to_string(tok.vocab_size()) +
                                ") differs from the checkpoint's vocab_size");
  // Documents are separated by EOS in the training data, so EOS first marks a document start.
  std::vector<int64_t> prompt = {tok.eos_id()};
  for (int32_t id : tok.encode(a.prompt)) prompt.push_back(id);

  std::vector<int32_t> produced;
  std::string shown;
  std::cout << a.prompt << std::flush;
  infer::GenerateTiming timing;
  const auto t0 = std::chrono::steady_clock::now();
  infer::generate(model, prompt, a.sampling, tok.eos_id(), [&](int64_t id) {
    produced.push_back(static_cast<int32_t>(id));
    const std::string text = tok.decode(produced);
    // Print what is new; a byte-fallback piece may complete a character only with the next token.
    if (text.size() > shown.size() && text.compare(0, shown.size(), shown) == 0) {
      std::cout << text.substr(shown.size()) << std::flush;
      shown = text;
    }
  }, &timing);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const std::string text = tok.decode(produced);
  if (text.size() > shown.size() && text.compare(0, shown.size(), shown) == 0) std::cout << text.substr(shown.size());
  std::cout << std::endl;
  // Speed on stderr (the text stays clean on stdout). The first decode step is the first to touch the
  // value rows of a new token; with --mmap and a cold page cache it pays the page faults.
  const auto& steps = timing.step_seconds;
  const double decode_s = std::accumulate(steps.begin(), steps.end(), 0.0);
  std::vector<double> later(steps.begin() + (steps.empty() ? 0 : 1), steps.end());
  const nlohmann::json stats = {
      {"tokens", produced.size()},
      {"seconds", seconds},
      {"tokens_per_second", seconds > 0 ? double(produced.size()) / seconds : 0.0},
      {"decode_tokens_per_second", decode_s > 0 ? double(steps.size()) / decode_s : 0.0},
      {"prompt_tokens", timing.prompt_tokens},
      {"prompt_ms", 1e3 * timing.prompt_seconds},
      {"first_step_ms", steps.empty() ? 0.0 : 1e3 * steps.front()},
      {"median_later_step_ms", 1e3 * median(later)},
      {"value_format", nn::to_string(loaded.value_format)},
      {"value_mib", double(loaded.value_bytes) / double(1 << 20)},
      {"mmap", a.mmap}};
  std::cerr << "generate: " << produced.size() << " tokens in " << seconds << " s ("
            << stats["tokens_per_second"].get<double>() << " tokens/s; decode steps: first "
            << stats["first_step_ms"].get<double>() << " ms, median of later " << stats["median_later_step_ms"].get<double>()
            << " ms)\n"
            << stats.dump() << std::endl;
}

}  // namespace

void add_generate_command(CLI::App& app) {
  auto a = std::make_shared<GenerateArgs>();
  auto* cmd = app.add_subcommand("generate", "Continue a prompt with a trained model (KV-cache decoding), "
                                             "streaming the text as it is produced; speed (tokens/s, first "
                                             "and later decode steps) is printed to stderr");
  cmd->add_option("checkpoint", a->checkpoint, "Checkpoint file (.safetensors)")->required()->check(CLI::ExistingFile);
  cmd->add_option("--prompt", a->prompt, "Text to continue")->required();
  cmd->add_option("--data", a->data_dir, "Prepared data folder holding the tokenizer (default: the run's)");
  cmd->add_option("--max-tokens", a->sampling.max_tokens, "Tokens to generate at most")->capture_default_str();
  cmd->add_option("--temperature", a->sampling.temperature, "Sampling temperature (0 = greedy)")->capture_default_str();
  cmd->add_option("--top-k", a->sampling.top_k, "Sample among the k most likely tokens (0 = all)")->capture_default_str();
  cmd->add_option("--top-p", a->sampling.top_p, "Nucleus sampling mass (1 = off)")->capture_default_str();
  cmd->add_option("--seed", a->sampling.seed, "Sampling seed")->capture_default_str();
  cmd->add_flag("--mmap", a->mmap,
                "Serve the memory value tables from a read-only mapping of the checkpoint file instead of "
                "loading them (tables larger than RAM; checksum not verified)");
  cmd->callback([a] { run_generate(*a); });
}

}  // namespace ultramem::cli
