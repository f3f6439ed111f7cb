// A model's UltraMem value tables as files, for tables larger than memory (ops/tiered_values.h,
// docs/tiered_tables.md): one <dir>/<layer name>.table per layer, written from a checkpoint by streaming
// and served behind bounded row caches by eval, generate and serve (--value-tables, --value-cache-gib).
#pragma once
#include <torch/nn/module.h>

#include <cstdint>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace ultramem::ops {
class TieredValues;
}

namespace ultramem::infer {

// --value-cache-gib in bytes; std::invalid_argument outside (0, 1024].
int64_t value_cache_bytes(double gib);

// <dir>/<layer_name>.table
std::string value_table_path(const std::string& dir, const std::string& layer_name);

struct ExportTablesOptions {
  std::string checkpoint;      // a checkpoint with float32 value tables
  std::string out_dir;         // created if missing
  std::string format = "int8";  // "int8" (one float32 scale per row) or "bf16"
};

// Writes every UltraMem layer's table of the checkpoint as value_table_path(out_dir, layer), quantised as
// set_value_format would quantise it in memory. The checkpoint is memory-mapped: no copy of a table is
// made, and the writer holds one chunk of rows. Checks the folder's free space first (std::runtime_error
// with the sizes); std::invalid_argument for a bad format, a model without UltraMem layers or tables
// that are not float32. Progress on `log`; returns a summary (one entry per layer: file, rows, GiB,
// seconds).
nlohmann::json export_value_tables(const ExportTablesOptions& options, std::ostream& log);

// Serves each UltraMem layer of `model` from value_table_path(dir, layer) behind its own row cache; the
// layers share cache_bytes in proportion to their rows. A layer with a permutation_key reads through the
// key (its stored permutation is not consulted). Returns the installed tables, in layer order. Throws
// std::runtime_error naming a missing or damaged file and std::invalid_argument for one that does not fit
// its layer (UltraMemImpl::set_tiered_values) or a model without UltraMem layers.
std::vector<std::shared_ptr<ops::TieredValues>> attach_value_tables(torch::nn::Module& model, const std::string& dir,
                                                                    int64_t cache_bytes);

}  // namespace ultramem::infer
