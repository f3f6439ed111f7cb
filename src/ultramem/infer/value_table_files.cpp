#include "ultramem/infer/value_table_files.h"

#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <stdexcept>

#include "ultramem/infer/model_loading.h"
#include "ultramem/infer/value_tables.h"
#include "ultramem/io/atomic_file.h"
#include "ultramem/ops/tiered_values.h"

namespace ultramem::infer {
namespace fs = std::filesystem;

int64_t value_cache_bytes(double gib) {
  if (!(gib > 0 && gib <= 1024))
    throw std::invalid_argument("--value-cache-gib must be in (0, 1024], got " + std::to_string(gib));
  return int64_t(gib * 1024.0 * 1024.0 * 1024.0);
}

std::string value_table_path(const std::string& dir, const std::string& layer_name) {
  return (fs::path(dir) / (layer_name + ".table")).string();
}

nlohmann::json export_value_tables(const ExportTablesOptions& options, std::ostream& log) {
  if (options.format != "int8" && options.format != "bf16")
    throw std::invalid_argument("--format: expected int8 or bf16, got \"" + options.format + "\"");
  const bool int8 = options.format == "int8";
  LoadOptions lo;
  lo.mmap = true;  // the tables stay in the file; the rows stream from the mapping
  auto loaded = load_model(options.checkpoint, lo);
  const auto layers = ultramem_layers(*loaded.model);
  if (layers.empty()) throw std::invalid_argument(options.checkpoint + " has no UltraMem layers: no value tables");
  double need = 0;
  for (const auto& [name, layer] : layers) {
    if (layer->values.scalar_type() != torch::kFloat)
      throw std::invalid_argument(options.checkpoint + ": the value table of " + name + " is " +
                                  nn::to_string(layer->value_format()) +
                                  "; export from the float32 checkpoint (the file rows are quantised from float32)");
    need += 4096.0 + double(layer->values.size(0)) * double(int8 ? layer->values.size(1) + 4 : 2 * layer->values.size(1));
  }
  fs::create_directories(options.out_dir);
  const double gib = 1024.0 * 1024.0 * 1024.0;
  const auto space = fs::space(options.out_dir);
  if (need + 0.25 * gib > double(space.available)) {
    char msg[400];
    std::snprintf(msg, sizeof msg, "the value tables need %.2f GiB in %s and only %.2f GiB are free there",
                  need / gib, options.out_dir.c_str(), double(space.available) / gib);
    throw std::runtime_error(msg);
  }
  nlohmann::json summary = nlohmann::json::array();
  for (const auto& [name, layer] : layers) {
    const std::string path = value_table_path(options.out_dir, name);
    for (const auto& stale : io::stale_temporaries(path)) fs::remove_all(stale);
    const auto values = layer->values.detach();  // [N, Dv] float32, mapped from the checkpoint
    const int64_t rows = values.size(0);
    const double bytes = 4096.0 + double(rows) * double(int8 ? values.size(1) + 4 : 2 * values.size(1));
    const auto t0 = std::chrono::steady_clock::now();
    auto last = t0;
    auto seconds = [](auto since) { return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count(); };
    ops::write_value_table(path, int8, values.contiguous(), [&](int64_t done) {
      if (seconds(last) < 5 && done < rows) return;
      last = std::chrono::steady_clock::now();
      const double s = seconds(t0), frac = double(done) / double(rows);
      char line[300];
      std::snprintf(line, sizeof line, "%s: %.2f / %.2f GiB, %.0f MB/s, %.0f s left", path.c_str(), bytes * frac / gib,
                    bytes / gib, s > 0 ? bytes * frac / s / 1e6 : 0.0, frac > 0 ? s / frac - s : 0.0);
      log << line << std::endl;
    });
    summary.push_back({{"layer", name},
                       {"file", path},
                       {"format", options.format},
                       {"rows", rows},
                       {"dv", values.size(1)},
                       {"gib", bytes / gib},
                       {"seconds", seconds(t0)}});
  }
  return summary;
}

std::vector<std::shared_ptr<ops::TieredValues>> attach_value_tables(torch::nn::Module& model, const std::string& dir,
                                                                    int64_t cache_bytes) {
  const auto layers = ultramem_layers(model);
  if (layers.empty()) throw std::invalid_argument("--value-tables: the model has no UltraMem layers");
  double rows = 0;
  for (const auto& [name, layer] : layers) rows += double(layer->config().physical_rows());
  std::vector<std::shared_ptr<ops::TieredValues>> out;
  for (const auto& [name, layer] : layers) {
    const auto& c = layer->config();
    const auto share = int64_t(double(cache_bytes) * double(c.physical_rows()) / rows);
    std::optional<uint64_t> key;
    if (c.permutation_key != 0) key = c.permutation_key;
    auto tiered = std::make_shared<ops::TieredValues>(value_table_path(dir, name), share, c.E, key);
    layer->set_tiered_values(tiered);
    out.push_back(std::move(tiered));
  }
  return out;
}

}  // namespace ultramem::infer
