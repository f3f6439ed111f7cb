// The flags that serve memory value tables from files (eval, generate, serve; docs/tiered_tables.md).
#pragma once
#include <string>

namespace CLI {
class App;
}

namespace ultramem::cli {

void add_value_table_options(CLI::App* cmd, std::string& dir, double& cache_gib);

}  // namespace ultramem::cli
