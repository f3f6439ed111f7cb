// `ultramem quantize CHECKPOINT [--values bf16|int8] [--keys bf16|int8] [--weights bf16|int8]`: flags -> infer::quantize_checkpoint (infer/quantize.h).
#include <CLI/CLI.hpp>

#include <memory>

#include "commands.h"
#include "ultramem/infer/quantize.h"

namespace ultramem::cli {

void add_quantize_command(CLI::App& app) {
  auto a = std::make_shared<infer::QuantizeOptions>();
  auto* cmd = app.add_subcommand(
      "quantize",
      "Store a checkpoint's memory value tables as bf16 or int8 (symmetric, one float scale per row) and/or "
      "set compact keys (--keys) and/or compact dense matrices (--weights) for inference, and report the validation-loss change (before, after, delta; also as a JSON line). eval and "
      "generate load the result like any checkpoint; training needs the float32 one");
  cmd->add_option("checkpoint", a->checkpoint, "Float32 checkpoint file (.safetensors)")
      ->required()
      ->check(CLI::ExistingFile);
  cmd->add_option("--values", a->values, "Value table format: bf16 or int8");
  cmd->add_option("--keys", a->keys,
                  "Key format of the inference path, recorded in the checkpoint (eval and generate use it unless "
                  "--keys overrides): bf16 or int8 (one scale per key row), or fp32; the key parameters stay "
                  "float32. Reports each memory layer's key_agreement");
  cmd->add_option("--weights", a->weights,
                  "Storage of the dense matrices the decode path reads (attention, FFN, MoE experts, LM head and the "
                  "embedding tied to it): bf16 or int8 (one scale per output row; products of up to 16 tokens then "
                  "round their inputs to int8 per block of 32 too and take integer dot products). The float32 "
                  "parameters are "
                  "rounded to it and the format recorded (eval and generate use it unless --weights overrides); a "
                  "token then reads 2x (bf16) or 4x (int8) fewer weight bytes")
      ->check(CLI::IsMember({"bf16", "int8"}));
  cmd->add_option("--out", a->out, "Output checkpoint (default: <checkpoint stem>.<format>.safetensors next to it)");
  cmd->add_option("--data", a->data_dir,
                  "Prepared data folder for the loss comparison (default: the run's, as `ultramem eval`; skipped "
                  "with a note when the default is missing)");
  cmd->add_flag("--no-eval", a->no_eval, "Skip the validation-loss comparison");
  cmd->add_option("--batch-size", a->batch_size, "Sequences per evaluation batch")->capture_default_str();
  cmd->add_option("--seq-len", a->seq_len, "Tokens per sequence (0 = the model's max_seq_len)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--max-batches", a->max_batches, "Evaluate at most this many batches (0 = the whole split)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->callback([a] { infer::quantize_checkpoint(*a); });
}

}  // namespace ultramem::cli
