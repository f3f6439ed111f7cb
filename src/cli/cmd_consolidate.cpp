// `ultramem consolidate CHECKPOINT [--out FILE]`: flags -> checkpoint::save_checkpoint of the assembled
// checkpoint (checkpoint/checkpoint.h).
#include <CLI/CLI.hpp>

#include <iostream>
#include <memory>

#include "commands.h"
#include "ultramem/checkpoint/checkpoint.h"

namespace ultramem::cli {

void add_consolidate_command(CLI::App& app) {
  struct Args {
    std::string checkpoint, out;
  };
  auto a = std::make_shared<Args>();
  auto* cmd = app.add_subcommand(
      "consolidate",
      "Write a sharded checkpoint (saved by several ranks, memory values in per-rank shard files) as one file: "
      "weights, optimizer state and configs, verified while reading. In place by default (the shard files are "
      "removed once the new file is written); with --out the original stays as it is");
  cmd->add_option("checkpoint", a->checkpoint, "Checkpoint file (.safetensors)")->required()->check(CLI::ExistingFile);
  cmd->add_option("--out", a->out, "Write the one-file checkpoint here instead of replacing CHECKPOINT");
  cmd->callback([a] {
    const auto ckpt = checkpoint::read_checkpoint(a->checkpoint);
    const std::string out = a->out.empty() ? a->checkpoint : a->out;
    checkpoint::save_checkpoint(out, ckpt);
    std::cout << "wrote " << out << " (one file; " << (ckpt.shard_world > 0 ? std::to_string(ckpt.shard_world) +
                                                                               " rank shards merged"
                                                                         : std::string("it was one file already"))
              << ")" << std::endl;
  });
}

}  // namespace ultramem::cli
