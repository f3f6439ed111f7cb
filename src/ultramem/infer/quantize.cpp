#include "ultramem/infer/quantize.h"

#include <torch/torch.h>

#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <iostream>
#include <optional>

#include "ultramem/checkpoint/run_folder.h"
#include "ultramem/data/prepared.h"
#include "ultramem/data/sampler.h"
#include "ultramem/data/shard.h"
#include "ultramem/infer/evaluate.h"
#include "ultramem/infer/model_loading.h"
#include "ultramem/infer/value_tables.h"
#include "ultramem/nn/model_config.h"

namespace ultramem::infer {
namespace {

namespace fs = std::filesystem;

// <dir>/<stem>.<tag>.safetensors next to the source checkpoint.
std::string default_out(const std::string& checkpoint, const std::string& tag) {
  const fs::path p(checkpoint);
  return (p.parent_path() / (p.stem().string() + "." + tag + ".safetensors")).string();
}

double mib(int64_t bytes) { return double(bytes) / double(1 << 20); }

}  // namespace

nlohmann::json quantize_checkpoint(const QuantizeOptions& a) {
  if (a.values.empty() && a.keys.empty() && a.weights.empty())
    throw std::invalid_argument("nothing to do: give --values bf16|int8, --keys bf16|int8 and/or --weights bf16|int8");
  const std::optional<nn::ValueFormat> weights =
      a.weights.empty() ? std::nullopt : std::optional<nn::ValueFormat>(nn::parse_value_format(a.weights));
  if (weights && *weights == nn::ValueFormat::kFloat32)
    throw std::invalid_argument("--weights: expected bf16 or int8 (rounded weights cannot be restored to fp32)");
  const bool convert_values = !a.values.empty();
  const nn::ValueFormat fmt = convert_values ? nn::parse_value_format(a.values) : nn::ValueFormat::kFloat32;
  if (convert_values && fmt == nn::ValueFormat::kFloat32)
    throw std::invalid_argument("--values: expected bf16 or int8 (fp32 is the format checkpoints are trained in)");
  const std::optional<nn::ValueFormat> keys =
      a.keys.empty() ? std::nullopt : std::optional<nn::ValueFormat>(nn::parse_value_format(a.keys));
  std::string tag = convert_values ? nn::to_string(fmt) : "";
  if (keys) tag += std::string(tag.empty() ? "" : ".") + "keys-" + nn::to_string(*keys);
  if (weights) tag += std::string(tag.empty() ? "" : ".") + "weights-" + nn::to_string(*weights);
  const std::string out = a.out.empty() ? default_out(a.checkpoint, tag) : a.out;
  if (fs::exists(out) && fs::equivalent(out, a.checkpoint))
    throw std::invalid_argument("--out " + out + " is the input checkpoint; write the quantised model elsewhere");
  const bool progress = ::isatty(2);
  const auto t0 = std::chrono::steady_clock::now();

  std::cerr << "loading " << a.checkpoint << std::endl;
  LoadOptions lo;
  lo.warn = [](const std::string& s) { std::cerr << "note: " << s << std::endl; };
  auto loaded = load_model(a.checkpoint, lo);
  auto& model = loaded.model;
  const auto layers = ultramem_layers(*model);
  if (layers.empty() && engram_layers(*model).empty() && convert_values)
    throw std::invalid_argument(a.checkpoint + ": the model has no memory value tables (UltraMem or Engram); nothing "
                                "to quantise");
  if (layers.empty() && keys)
    throw std::invalid_argument(a.checkpoint + ": --keys: the model has no UltraMem memory layers (only they have "
                                "keys)");
  if (convert_values && loaded.value_format != nn::ValueFormat::kFloat32)
    throw std::invalid_argument(a.checkpoint + ": the value tables are already " + nn::to_string(loaded.value_format) +
                                "; quantise the float32 checkpoint");

  // Validation batches, when prepared data is available (as `ultramem eval` finds it).
  std::vector<data::Batch> batches;
  std::string data_dir;
  if (!a.no_eval) {
    data_dir = checkpoint::data_dir_for_checkpoint(a.checkpoint, a.data_dir);
    if (a.data_dir.empty() && !fs::exists(data_dir)) {
      std::cerr << "note: no prepared data at " << data_dir
                << "; skipping the validation-loss comparison (pass --data DIR)" << std::endl;
    } else {
      batches = validation_batches(data::load_prepared(data_dir), model->config(), a.batch_size, a.seq_len,
                                   a.max_batches);
    }
  }
  auto evaluate = [&](const char* what) {
    const auto r = mean_loss(model, batches, [&](size_t done, size_t total) {
      if (progress) std::cerr << "\rvalidation loss, " << what << ": batch " << done << "/" << total << std::flush;
    });
    if (progress) std::cerr << "\n";
    return r;
  };

  LossResult before, after;
  const nn::ValueFormat keys_before = loaded.key_format;
  if (!batches.empty()) before = evaluate("as loaded");
  const int64_t bytes_before = value_bytes(*model);
  if (convert_values) {
    std::cerr << "quantising " << layers.size() + engram_layers(*model).size() << " value table(s) to "
              << nn::to_string(fmt) << std::endl;
    set_value_format(*model, fmt);
  }
  if (keys) set_key_format(*model, *keys);
  const nn::ValueFormat weights_before = loaded.weight_format;
  if (weights) {
    if (weights_before != nn::ValueFormat::kFloat32 && weights_before != *weights)
      throw std::invalid_argument(a.checkpoint + ": the weights are already rounded to " + nn::to_string(weights_before) +
                                  "; quantise the float32 checkpoint");
    std::cerr << "rounding the dense matrices to " << nn::to_string(*weights) << std::endl;
    model->set_weight_format(*weights);
  }
  const int64_t bytes_after = value_bytes(*model);
  nlohmann::json agreement = nlohmann::json::object();
  if (!batches.empty()) {
    model->telemetry();  // fresh windows: key_agreement over this evaluation
    after = evaluate("converted");
    const auto t = model->telemetry();
    for (auto it = t.begin(); it != t.end(); ++it)
      if (it.key().find(".key_agreement") != std::string::npos) agreement[it.key()] = it.value();
  }

  std::cerr << "writing " << out << std::endl;
  save_weights(out, *model, nn::model_config_to_json(model->config()), loaded.train_config);

  nlohmann::json j = {{"checkpoint", a.checkpoint},
                      {"out", out},
                      {"values", nn::to_string(value_format(*model))},
                      {"keys_before", nn::to_string(keys_before)},
                      {"keys", nn::to_string(key_format(*model))},
                      {"weights_before", nn::to_string(weights_before)},
                      {"weights", nn::to_string(model->weight_format())},
                      {"compact_weight_mib", mib(model->compact_weight_bytes())},
                      {"value_mib_before", mib(bytes_before)},
                      {"value_mib_after", mib(bytes_after)},
                      {"seconds", std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()}};
  std::cout << "value tables: " << mib(bytes_before) << " MiB " << nn::to_string(loaded.value_format) << " -> "
            << mib(bytes_after) << " MiB " << nn::to_string(value_format(*model)) << "\n";
  if (keys) std::cout << "keys: " << nn::to_string(keys_before) << " -> " << nn::to_string(*keys) << "\n";
  if (weights)
    std::cout << "dense matrices: " << nn::to_string(weights_before) << " -> " << nn::to_string(*weights) << " ("
              << mib(model->compact_weight_bytes()) << " MiB read by the decode ops)\n";
  if (!batches.empty()) {
    j["data_dir"] = data_dir;
    j["tokens"] = before.tokens;
    j["val_loss_before"] = before.loss;
    j["val_loss_after"] = after.loss;
    j["val_loss_delta"] = after.loss - before.loss;
    if (keys && *keys != nn::ValueFormat::kFloat32) j["key_agreement"] = agreement;
    std::cout << "validation loss: " << before.loss << " (as loaded) -> " << after.loss << " (converted), delta "
              << after.loss - before.loss << " over " << before.tokens << " tokens\n";
    for (auto it = agreement.begin(); it != agreement.end(); ++it)
      if (keys && *keys != nn::ValueFormat::kFloat32) std::cout << it.key() << ": " << it.value().dump() << "\n";
  }
  std::cout << "wrote " << out << "\n" << j.dump() << std::endl;
  return j;
}


}  // namespace ultramem::infer
