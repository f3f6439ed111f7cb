// `ultramem generate CHECKPOINT --prompt TEXT | --prompts-file FILE`: flags -> infer::generate_from_checkpoint
// (infer/text_generation.h).
#include <CLI/CLI.hpp>

#include <iostream>
#include <memory>

#include "commands.h"
#include "value_table_options.h"
#include "ultramem/infer/text_generation.h"

namespace ultramem::cli {

void add_generate_command(CLI::App& app) {
  auto a = std::make_shared<infer::GenerateOptions>();
  auto* cmd = app.add_subcommand("generate", "Continue a prompt with a trained model (KV-cache decoding), "
                                             "streaming the text as it is produced, or several prompts "
                                             "(--prompts-file) decoded together in batches; speed (tokens/s, "
                                             "first and later decode steps) is printed to stderr");
  cmd->add_option("checkpoint", a->checkpoint, "Checkpoint file (.safetensors)")->required()->check(CLI::ExistingFile);
  auto* prompt = cmd->add_option("--prompt", a->prompt, "Text to continue");
  auto* file = cmd->add_option("--prompts-file", a->prompts_file,
                               "Several prompts, one per line ('-': standard input), decoded together in batches; "
                               "prints one JSON line per prompt (index, prompt, completion, tokens, stop_reason)");
  prompt->excludes(file);
  file->excludes(prompt);
  cmd->add_option("--batch", a->batch, "With --prompts-file: prompts decoded together per batch")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--data", a->data_dir, "Prepared data folder holding the tokenizer (default: the run folder's tokenizer)");
  cmd->add_option("--max-tokens", a->sampling.max_tokens, "Tokens to generate at most")->capture_default_str();
  cmd->add_option("--temperature", a->sampling.temperature, "Sampling temperature (0 = greedy)")->capture_default_str();
  cmd->add_option("--top-k", a->sampling.top_k, "Sample among the k most likely tokens (0 = all)")->capture_default_str();
  cmd->add_option("--top-p", a->sampling.top_p, "Nucleus sampling mass (1 = off)")->capture_default_str();
  cmd->add_option("--seed", a->sampling.seed, "Sampling seed (a non-negative integer)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--keys", a->keys,
                  "Key storage of the memory layers at inference: fp32 (as trained), bf16 or int8 (one scale per key row); "
                  "default: the checkpoint's (quantize --keys), else fp32")
      ->check(CLI::IsMember({"fp32", "bf16", "int8"}));
  cmd->add_option("--weights", a->weights,
                  "Storage of the dense matrices (attention, FFN, experts, LM head): fp32, bf16 or int8 (one scale per "
                  "output row; at up to 16 tokens their inputs rounded to int8 per block of 32 too), the weights "
                  "rounded to it "
                  "(default: the checkpoint's, see quantize --weights)")
      ->check(CLI::IsMember({"fp32", "bf16", "int8"}));
  cmd->add_option("--value-prefetch", a->value_prefetch,
                  "Bytes of value rows a memory placed i:j (i < j) prefetches after its retrieval at block i, for "
                  "its lookup at block j (default 0: off; it measured no gain with tables in RAM, see "
                  "docs/performance.md D.15)")
      ->check(CLI::NonNegativeNumber);
  add_value_table_options(cmd, a->value_tables, a->value_cache_gib);
  cmd->add_flag("--mmap", a->mmap,
                "Serve the memory value tables from a read-only mapping of the checkpoint file instead of "
                "loading them (tables larger than RAM; checksum not verified)");
  cmd->callback([a, prompt, file] {
    if (prompt->count() == 0 && file->count() == 0) throw CLI::RequiredError("--prompt or --prompts-file");
    infer::generate_from_checkpoint(*a, std::cout, std::cerr);
  });
}

}  // namespace ultramem::cli
