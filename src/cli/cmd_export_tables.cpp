// `ultramem export-tables CHECKPOINT --out DIR [--format int8|bf16]`: flags -> infer::export_value_tables
// (infer/value_table_files.h).
#include <CLI/CLI.hpp>

#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "ultramem/infer/value_table_files.h"

namespace ultramem::cli {

void add_export_tables_command(CLI::App& app) {
  auto a = std::make_shared<infer::ExportTablesOptions>();
  auto* cmd = app.add_subcommand(
      "export-tables",
      "Write a checkpoint's memory value tables as table files (<layer>.table: int8 rows with their scale, or "
      "bf16), streamed from the memory-mapped checkpoint without a copy of any table, for serving tables larger "
      "than RAM from disk: eval / generate / serve --value-tables DIR. Prints one JSON line per table");
  cmd->add_option("checkpoint", a->checkpoint, "Checkpoint with float32 value tables (.safetensors)")
      ->required()
      ->check(CLI::ExistingFile);
  cmd->add_option("--out", a->out_dir, "Folder for the table files (created if missing)")->required();
  cmd->add_option("--format", a->format, "Row format: int8 (one float32 scale per row) or bf16")
      ->capture_default_str()
      ->check(CLI::IsMember({"int8", "bf16"}));
  cmd->callback([a] {
    for (const auto& t : infer::export_value_tables(*a, std::cerr)) std::cout << t.dump() << std::endl;
  });
}

}  // namespace ultramem::cli
