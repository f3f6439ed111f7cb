// `ultramem export CHECKPOINT DIR --format hf`: flags -> infer::export_hf (infer/hf_export.h).
#include <CLI/CLI.hpp>

#include <iostream>
#include <memory>

#include "commands.h"
#include "ultramem/infer/hf_export.h"

namespace ultramem::cli {

void add_export_command(CLI::App& app) {
  auto a = std::make_shared<infer::HfExportOptions>();
  auto format = std::make_shared<std::string>();
  auto* cmd = app.add_subcommand(
      "export",
      "Write a checkpoint as a portable model folder (--format hf): config.json, model.safetensors with one tensor "
      "per matrix in [out, in] layout and descriptive names, the tokenizer and generation_config.json. Python's "
      "ultramem.TransformerLM.from_pretrained(DIR) loads it (docs/python.md). A sharded checkpoint is consolidated. "
      "Prints a JSON summary");
  cmd->add_option("checkpoint", a->checkpoint, "Checkpoint (.safetensors; the main file of a sharded run)")
      ->required()
      ->check(CLI::ExistingFile);
  cmd->add_option("dir", a->out_dir, "Output folder (created; its files are replaced)")->required();
  cmd->add_option("--format", *format, "Folder layout: hf (the only one so far)")
      ->required()
      ->check(CLI::IsMember({"hf"}));
  cmd->add_option("--tokenizer", a->tokenizer,
                  "tokenizer.model to include (default: the run folder's, else the prepared data's)")
      ->check(CLI::ExistingFile);
  cmd->add_option("--data", a->data_dir, "Prepared data folder holding the tokenizer (default: the run's)");
  // format is captured so that the string CLI11 writes into lives as long as the command.
  cmd->callback([a, format] { std::cout << infer::export_hf(*a, std::cerr).dump() << std::endl; });
}

}  // namespace ultramem::cli
