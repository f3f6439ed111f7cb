// `ultramem info CONFIG`: parameters and FLOPs per token of a model config (nn/model_info.h).
#include <CLI/CLI.hpp>

#include <iostream>
#include <memory>

#include "commands.h"
#include "ultramem/nn/model_config.h"
#include "ultramem/nn/model_info.h"

#include <nlohmann/json.hpp>

namespace ultramem::cli {

void add_info_command(CLI::App& app) {
  struct Args {
    std::string config;
    int64_t context = 0;
    bool json = false;
  };
  auto a = std::make_shared<Args>();
  auto* cmd = app.add_subcommand(
      "info", "Print total and activated parameters and forward FLOPs per token of a model config, split "
              "into embedding, attention, dense FFN, experts and memory parts");
  cmd->add_option("config", a->config, "Model config, or run config with \"model\" (JSON)")->required()->check(CLI::ExistingFile);
  cmd->add_option("--context", a->context, "Keys per query for attention FLOPs (0 = max_seq_len/2)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_flag("--json", a->json, "Print JSON instead of a table");
  cmd->callback([a] {
    const auto cfg = nn::load_model_config(a->config);
    const auto info = nn::model_info(cfg, a->context);
    if (a->json) {
      std::cout << nn::model_info_to_json(info).dump(2) << std::endl;
    } else {
      std::cout << cfg.name << " (" << a->config << ")\n" << nn::model_info_table(info) << std::flush;
    }
  });
}

}  // namespace ultramem::cli
