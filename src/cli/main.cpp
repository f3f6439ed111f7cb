// The `ultramem` command line tool: one subcommand per job (see `ultramem --help`).
#include <CLI/CLI.hpp>

#include <iostream>
#include <stdexcept>

#include "commands.h"
#include "ultramem/runtime.h"

int main(int argc, char** argv) {
  CLI::App app{
      "ultramem: UltraMem ultra-sparse memory layers for transformers (CPU, libtorch).\n"
      "Typical flow: prepare -> info -> train -> eval / generate."};
  app.require_subcommand(1);
  int threads = ultramem::default_threads();
  app.add_option("--threads", threads, "Threads for libtorch and the kernels (default: all cores)")
      ->capture_default_str();
  app.parse_complete_callback([&] { ultramem::set_threads(threads); });
  ultramem::cli::add_prepare_command(app);
  ultramem::cli::add_info_command(app);
  ultramem::cli::add_train_command(app);
  ultramem::cli::add_eval_command(app);
  ultramem::cli::add_generate_command(app);
  ultramem::cli::add_quantize_command(app);
  ultramem::cli::add_layer_demo_command(app);
  ultramem::cli::add_experiment_command(app);
  ultramem::cli::add_bench_command(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const std::exception& e) {
    std::cerr << "ultramem: error: " << e.what() << std::endl;
    return 1;
  }
  return 0;
}
