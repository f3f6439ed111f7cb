// `ultramem eval CHECKPOINT`: flags -> infer::evaluate_checkpoint (infer/evaluate.h).
#include <CLI/CLI.hpp>

#include <iostream>
#include <memory>

#include "commands.h"
#include "value_table_options.h"
#include "ultramem/infer/evaluate.h"

namespace ultramem::cli {

void add_eval_command(CLI::App& app) {
  auto a = std::make_shared<infer::EvalOptions>();
  auto* cmd = app.add_subcommand(
      "eval", "Evaluate a checkpoint (float32, bf16 or int8 value tables) on the validation split: loss, perplexity, bits per byte (nats/token "
              "scaled by the split's tokens per byte), memory-layer usage (coverage, KL to uniform, scores) "
              "and peak memory");
  cmd->add_option("checkpoint", a->checkpoint, "Checkpoint file (.safetensors)")->required()->check(CLI::ExistingFile);
  cmd->add_option("--data", a->data_dir, "Prepared data folder (default: the one the run was trained on)");
  cmd->add_option("--batch-size", a->batch_size, "Sequences per batch")->capture_default_str();
  cmd->add_option("--seq-len", a->seq_len, "Tokens per sequence (0 = the model's max_seq_len)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--max-batches", a->max_batches, "Evaluate at most this many batches (0 = the whole split)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--keys", a->keys,
                  "Key storage of the memory layers: fp32 (as trained), bf16 or int8 (one scale per key row; default: "
                  "the checkpoint's, see quantize --keys); "
                  "memory_layers then reports key_agreement, the share of kept candidates the fp32 keys keep too")
      ->check(CLI::IsMember({"fp32", "bf16", "int8"}));
  cmd->add_option("--weights", a->weights,
                  "Storage of the dense matrices (attention, FFN, experts, LM head): fp32, bf16 or int8 (one scale per "
                  "output row; at up to 16 tokens their inputs rounded to int8 per block of 32 too), the weights "
                  "rounded to it "
                  "(default: the checkpoint's, see quantize --weights)")
      ->check(CLI::IsMember({"fp32", "bf16", "int8"}));
  cmd->add_option("--filter", a->filter,
                  "Evaluate with this retrieval filter instead of the trained one: rank1 (the paper's), two_sign or "
                  "rank_r")
      ->check(CLI::IsMember({"rank1", "two_sign", "rank_r"}));
  cmd->add_option("--m-neg", a->filter_m_neg,
                  "With --filter two_sign: first-stage candidates per side from the negative end (0 = m_first / 2)")
      ->capture_default_str();
  cmd->add_option("--filter-rank", a->filter_rank,
                  "With --filter rank_r: filter scores per side, in [1, r] (0 = r)")
      ->capture_default_str();
  cmd->add_option("--m-first", a->filter_m_first, "With --filter: first-stage candidates per side (0 = as trained)")
      ->capture_default_str();
  add_value_table_options(cmd, a->value_tables, a->value_cache_gib);
  cmd->add_flag("--mmap", a->mmap,
                "Serve the memory value tables from a read-only mapping of the checkpoint file instead of "
                "loading them (tables larger than RAM; checksum not verified). first_batch_ms vs "
                "median_later_batch_ms shows the first-touch cost");
  cmd->callback([a] { std::cout << infer::evaluate_checkpoint(*a).dump(2) << std::endl; });
}

}  // namespace ultramem::cli
