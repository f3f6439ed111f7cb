// `ultramem generate CHECKPOINT --prompt TEXT`: KV-cache sampling, streamed as it is produced.
#include <CLI/CLI.hpp>
#include <torch/torch.h>

#include <iostream>
#include <memory>

#include "commands.h"
#include "model_loading.h"
#include "run_files.h"
#include "ultramem/data/prepared.h"
#include "ultramem/data/tokenizer.h"
#include "ultramem/infer/sampling.h"

namespace ultramem::cli {
namespace {

struct GenerateArgs {
  std::string checkpoint;
  std::string data_dir;
  std::string prompt;
  infer::SamplingOptions sampling;
};

void run_generate(const GenerateArgs& a) {
  a.sampling.validate();
  auto model = load_transformer(a.checkpoint);
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
  infer::generate(model, prompt, a.sampling, tok.eos_id(), [&](int64_t id) {
    produced.push_back(static_cast<int32_t>(id));
    const std::string text = tok.decode(produced);
    // Print what is new; a byte-fallback piece may complete a character only with the next token.
    if (text.size() > shown.size() && text.compare(0, shown.size(), shown) == 0) {
      std::cout << text.substr(shown.size()) << std::flush;
      shown = text;
    }
  });
  const std::string text = tok.decode(produced);
  if (text.size() > shown.size() && text.compare(0, shown.size(), shown) == 0) std::cout << text.substr(shown.size());
  std::cout << std::endl;
}

}  // namespace

void add_generate_command(CLI::App& app) {
  auto a = std::make_shared<GenerateArgs>();
  auto* cmd = app.add_subcommand("generate", "Continue a prompt with a trained model (KV-cache decoding), "
                                             "streaming the text as it is produced");
  cmd->add_option("checkpoint", a->checkpoint, "Checkpoint file (.safetensors)")->required()->check(CLI::ExistingFile);
  cmd->add_option("--prompt", a->prompt, "Text to continue")->required();
  cmd->add_option("--data", a->data_dir, "Prepared data folder holding the tokenizer (default: the run's)");
  cmd->add_option("--max-tokens", a->sampling.max_tokens, "Tokens to generate at most")->capture_default_str();
  cmd->add_option("--temperature", a->sampling.temperature, "Sampling temperature (0 = greedy)")->capture_default_str();
  cmd->add_option("--top-k", a->sampling.top_k, "Sample among the k most likely tokens (0 = all)")->capture_default_str();
  cmd->add_option("--top-p", a->sampling.top_p, "Nucleus sampling mass (1 = off)")->capture_default_str();
  cmd->add_option("--seed", a->sampling.seed, "Sampling seed")->capture_default_str();
  cmd->callback([a] { run_generate(*a); });
}

}  // namespace ultramem::cli
