// The `ultramem` command line tool: one subcommand per job (see `ultramem --help`).
#include <CLI/CLI.hpp>
#include <torch/version.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <iostream>
#include <stdexcept>
#include <string>

#include "commands.h"
#include "ultramem/io/error_message.h"
#include "ultramem/ops/runtime.h"

namespace {

std::string version_line() {
  return std::string("ultramem ") + ULTRAMEM_VERSION + " (git " + ULTRAMEM_GIT_REVISION + "), kernels " +
         ultramem::kernel_isa() + ", libtorch " + TORCH_VERSION;
}

// The first word that is not an option (or the value of --threads): the subcommand's name, or "".
std::string first_command_word(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const std::string s = argv[i];
    if (s == "--threads") {
      ++i;
      continue;
    }
    if (!s.empty() && s[0] == '-') continue;
    return s;
  }
  return "";
}

}  // namespace

int main(int argc, char** argv) {
  // OpenMP's threads (libgomp: the kernels and libtorch's parallel loops) spin after each parallel
  // region by default, while OpenBLAS runs its own threads: on a machine with few cores they take each
  // other's time (a batch-64 decode step took 2.4x longer with 2 threads than with one; with passive
  // waiting it is 1.7x faster; docs/performance.md, D.14). libgomp reads OMP_WAIT_POLICY when it is
  // loaded, so the process restarts itself once with it set to passive unless the user set it.
  if (std::getenv("OMP_WAIT_POLICY") == nullptr) {
    ::setenv("OMP_WAIT_POLICY", "passive", 1);
    ::execv("/proc/self/exe", argv);  // returns only on failure: go on with the default policy
  }
  CLI::App app{
      "ultramem: UltraMem ultra-sparse memory layers for transformers (CPU, libtorch).\n"
      "Typical flow: prepare -> info -> train -> eval / generate / serve."};
  app.require_subcommand(1);
  app.fallthrough();  // global options (--threads) also after the subcommand
  app.set_version_flag("--version", version_line(), "Print version, git revision, kernel ISA and libtorch version");
  int threads = ultramem::default_threads();
  app.add_option("--threads", threads, "Threads for libtorch and the kernels (default: all cores)")
      ->capture_default_str()
      ->check(CLI::Range(1, 4096));
  app.parse_complete_callback([&] { ultramem::set_threads(threads); });
  ultramem::cli::add_prepare_command(app);
  ultramem::cli::add_info_command(app);
  ultramem::cli::add_train_command(app);
  ultramem::cli::add_eval_command(app);
  ultramem::cli::add_generate_command(app);
  ultramem::cli::add_serve_command(app);
  ultramem::cli::add_quantize_command(app);
  ultramem::cli::add_export_command(app);
  ultramem::cli::add_export_tables_command(app);
  ultramem::cli::add_consolidate_command(app);
  ultramem::cli::add_layer_demo_command(app);
  ultramem::cli::add_experiment_command(app);
  ultramem::cli::add_bench_command(app);

  const std::string word = first_command_word(argc, argv);
  if (!word.empty()) {
    bool known = false;
    std::string names;
    for (const auto* sub : app.get_subcommands([](CLI::App*) { return true; })) {
      known = known || sub->get_name() == word;
      names += (names.empty() ? "" : ", ") + sub->get_name();
    }
    if (!known) {
      std::cerr << "ultramem: error: unknown command '" << word << "'; the commands are: " << names
                << " (ultramem --help explains each)" << std::endl;
      return 2;
    }
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const std::exception& e) {
    std::cerr << "ultramem: error: " << ultramem::io::error_message(e) << std::endl;
    return 1;
  }
  return 0;
}
