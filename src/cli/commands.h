// Subcommands of the `ultramem` tool; each adds itself to the CLI11 app and runs from its callback.
#pragma once

namespace CLI {
class App;
}

namespace ultramem::cli {

void add_prepare_command(CLI::App& app);
void add_info_command(CLI::App& app);
void add_train_command(CLI::App& app);
void add_eval_command(CLI::App& app);
void add_generate_command(CLI::App& app);
void add_serve_command(CLI::App& app);
void add_quantize_command(CLI::App& app);
void add_export_tables_command(CLI::App& app);
void add_export_command(CLI::App& app);
void add_consolidate_command(CLI::App& app);
void add_layer_demo_command(CLI::App& app);
void add_experiment_command(CLI::App& app);
void add_bench_command(CLI::App& app);

}  // namespace ultramem::cli
