#include "ultramem/infer/model_loading.h"

#include <torch/torch.h>

#include <algorithm>
#include <stdexcept>

#include "ultramem/infer/value_table_files.h"
#include "ultramem/infer/value_tables.h"
#include "ultramem/io/safetensors.h"
#include "ultramem/ops/huge_page_tensor.h"
#include "ultramem/nn/model_config.h"
#include "ultramem/nn/model_info.h"
#include "ultramem/checkpoint/checkpoint.h"

namespace ultramem::infer {
namespace {

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw std::runtime_error("checkpoint " + path + ": " + what);
}

}  // namespace

LoadedModel load_model(const std::string& path, const LoadOptions& options) {
  LoadedModel out;
  const bool map = options.mmap || !options.value_tables.empty();
  checkpoint::Checkpoint ckpt = map ? checkpoint::map_checkpoint(path, &out.copied) : checkpoint::read_checkpoint(path);
  auto cfg = nn::model_config_from_json(ckpt.model_config);
  // The model is built from the stored config itself; comparing against its normalised form (defaults
  // filled in) lets checkpoints written before a config key existed load with that key's default.
  ckpt.model_config = nn::model_config_to_json(cfg);
  cfg.ultramem.init_values = false;  // the tables come from the checkpoint: do not fill them first
  nn::check_fits_in_memory("the model of " + path,
                           nn::inference_memory(nn::model_info(cfg), /*without_value_tables=*/map));
  nn::Transformer model(cfg);

  // Value tables as stored: mapped ones are installed as they are (read-only), bf16 / int8 ones as
  // huge-page copies; float32 ones are copied into the layer's own huge-page table below.
  const auto is_copied = [&](const std::string& n) {
    return std::find(out.copied.begin(), out.copied.end(), n) != out.copied.end();
  };
  // Installs a stored table (and its int8 scale) of the layer `name`: mapped as it is, or a compact one as a
  // huge-page copy. Tensors that do not fit [rows, width] are left to load_model_state, which names them.
  auto install = [&](const std::string& name, int64_t rows, int64_t width, const auto& set_table) {
    const auto v = ckpt.model.find(name + ".values");
    if (v == ckpt.model.end()) return;
    const auto s = ckpt.model.find(name + ".values_scale");
    const torch::Tensor values = v->second, scale = s == ckpt.model.end() ? torch::Tensor() : s->second;
    const bool int8 = values.scalar_type() == torch::kChar;
    const bool fits = values.dim() == 2 && values.size(0) == rows && values.size(1) == width &&
                      (values.scalar_type() == torch::kFloat || values.scalar_type() == torch::kBFloat16 || int8) &&
                      (int8 == scale.defined());
    if (!fits) return;
    const bool mapped = map && !is_copied(name + ".values") && !(int8 && is_copied(name + ".values_scale"));
    try {
      if (mapped) {
        set_table(values, scale, /*read_only=*/true);
        io::advise_random_access(values);
        ++out.mapped_tables;
      } else if (values.scalar_type() != torch::kFloat) {
        set_table(ops::detail::copy_to_huge_pages(values),
                  int8 ? ops::detail::copy_to_huge_pages(scale) : torch::Tensor(), /*read_only=*/false);
      }
    } catch (const std::exception& e) {
      fail(path, name + ": " + e.what());
    }
  };
  for (auto& [name, layer] : ultramem_layers(*model)) {
    const auto& lc = layer->config();
    // With table files the stored permutation stays in the mapping too: a layer with a permutation_key
    // never reads it, one without reads 8 bytes of it per row looked up. (A table that does not fit fails
    // in load_model_state below.)
    const auto p = ckpt.model.find(name + ".perm");
    if (!options.value_tables.empty() && p != ckpt.model.end() && !is_copied(name + ".perm") &&
        p->second.dim() == 1 && p->second.size(0) == lc.n * lc.n && p->second.scalar_type() == torch::kLong) {
      layer->set_permutation_table(p->second);
      io::advise_random_access(p->second);
      ++out.mapped_permutations;
    }
    auto* l = layer;
    install(name, lc.physical_rows(), lc.Dv,
            [&](torch::Tensor v, torch::Tensor sc, bool ro) { l->set_value_table(std::move(v), std::move(sc), ro); });
  }
  for (auto& [name, layer] : engram_layers(*model)) {
    auto* l = layer;
    install(name, l->values.size(0), l->config().row_width(),
            [&](torch::Tensor v, torch::Tensor sc, bool ro) { l->set_value_table(std::move(v), std::move(sc), ro); });
  }
  if (options.warn) {
    if (map)
      options.warn("memory-mapped " + std::to_string(out.mapped_tables) + " value table(s) of " + path +
                   " (checksum not verified)");
    std::vector<std::string> tables;
    for (const auto& [name, layer] : ultramem_layers(*model)) tables.push_back(name);
    for (const auto& [name, layer] : engram_layers(*model)) tables.push_back(name);
    for (const auto& name : tables)
      for (const std::string& n : {name + ".values", name + ".values_scale"})
        if (is_copied(n))
          options.warn("tensor '" + n + "' is not 64-byte aligned in " + path + "; copied instead of mapped");
  }
  checkpoint::load_model_state(ckpt, *model, nn::model_config_to_json(model->config()));
  model->eval();
  // A format: the option, else the one recorded in the metadata under `key`, else fp32.
  auto format_of = [&](const char* key, const std::optional<nn::ValueFormat>& option) {
    if (option) return *option;
    const auto rec = ckpt.metadata.find(key);
    if (rec == ckpt.metadata.end()) return nn::ValueFormat::kFloat32;
    try {
      return nn::parse_value_format(rec->second);
    } catch (const std::invalid_argument& e) {
      fail(path, std::string("metadata ") + key + ": " + e.what());
    }
    return nn::ValueFormat::kFloat32;  // not reached: fail throws
  };
  out.key_format = format_of(kKeyFormatKey, options.key_format);
  set_key_format(*model, out.key_format);
  out.weight_format = format_of(kWeightFormatKey, options.weight_format);
  model->set_weight_format(out.weight_format);
  if (!options.filter.empty()) {
    const auto f = nn::parse_retrieval_filter(options.filter);
    for (auto& [name, layer] : ultramem_layers(*model)) {
      try {
        layer->set_filter(f, options.filter_m_neg, options.filter_m_first, options.filter_rank);
      } catch (const std::invalid_argument& e) {
        throw std::invalid_argument("--filter " + options.filter + " on " + name + ": " + e.what());
      }
    }
  }
  out.value_format = value_format(*model);
  const auto stored = ckpt.metadata.find(kValueFormatKey);
  if (stored != ckpt.metadata.end() && stored->second != nn::to_string(out.value_format))
    fail(path, "metadata says value_format '" + stored->second + "' but the value tables are " +
                   nn::to_string(out.value_format));
  out.value_bytes = value_bytes(*model);
  if (!options.value_tables.empty()) {
    out.file_tables = int64_t(attach_value_tables(*model, options.value_tables, options.value_cache_bytes).size());
    if (options.warn)
      options.warn("serving " + std::to_string(out.file_tables) + " value table(s) from the files in " +
                   options.value_tables + " behind " + std::to_string(options.value_cache_bytes >> 20) +
                   " MiB of row cache");
  }
  out.train_config = ckpt.train_config;
  out.model = model;
  return out;
}

}  // namespace ultramem::infer
