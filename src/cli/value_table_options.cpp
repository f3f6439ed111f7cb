#include "value_table_options.h"

#include <CLI/CLI.hpp>

namespace ultramem::cli {

void add_value_table_options(CLI::App* cmd, std::string& dir, double& cache_gib) {
  cmd->add_option("--value-tables", dir,
                  "Serve the memory value tables from the table files in this folder (<layer>.table, written by "
                  "`ultramem export-tables`) behind row caches of --value-cache-gib, instead of holding them in "
                  "memory (tables larger than RAM; docs/tiered_tables.md)")
      ->check(CLI::ExistingDirectory);
  cmd->add_option("--value-cache-gib", cache_gib, "The row caches' cap with --value-tables (GiB)")->capture_default_str();
}

}  // namespace ultramem::cli
