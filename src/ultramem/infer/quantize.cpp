#include "ultramem/infer/quantize.h"

#include <torch/torch.h>

#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <iostream>

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

// <dir>/<stem>.<format>.safetensors next to the source checkpoint.
std::string default_out(const std::string& checkpoint, nn::ValueFormat f) {
  const fs::path p(checkpoint);
  return (p.parent_path() / (p.stem().string() + "." + nn::to_string(f) + ".safetensors")).string();
}

double mib(int64_t bytes) { return double(bytes) / double(1 << 20); }

}  // namespace

nlohmann::json quantize_checkpoint(const QuantizeOptions& a) {
  const nn::ValueFormat fmt = nn::parse_value_format(a.values);
  if (fmt == nn::ValueFormat::kFloat32)
    throw std::invalid_argument("--values: expected bf16 or int8 (fp32 is the format checkpoints are trained in)");
  const std::string out = a.out.empty() ? default_out(a.checkpoint, fmt) : a.out;
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
  if (layers.empty())
    throw std::invalid_argument(a.checkpoint + ": the model has no UltraMem memory layers; nothing to quantise");
  if (loaded.value_format != nn::ValueFormat::kFloat32)
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
  if (!batches.empty()) before = evaluate("fp32");
  const int64_t bytes_before = value_bytes(*model);
  std::cerr << "quantising " << layers.size() << " value table(s) to " << nn::to_string(fmt) << std::endl;
  set_value_format(*model, fmt);
  const int64_t bytes_after = value_bytes(*model);
  if (!batches.empty()) after = evaluate(nn::to_string(fmt));

  std::cerr << "writing " << out << std::endl;
  save_weights(out, *model, nn::model_config_to_json(model->config()), loaded.train_config);

  nlohmann::json j = {{"checkpoint", a.checkpoint},
                      {"out", out},
                      {"values", nn::to_string(fmt)},
                      {"value_mib_before", mib(bytes_before)},
                      {"value_mib_after", mib(bytes_after)},
                      {"seconds", std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()}};
  std::cout << "value tables: " << mib(bytes_before) << " MiB fp32 -> " << mib(bytes_after) << " MiB "
            << nn::to_string(fmt) << "\n";
  if (!batches.empty()) {
    j["data_dir"] = data_dir;
    j["tokens"] = before.tokens;
    j["val_loss_before"] = before.loss;
    j["val_loss_after"] = after.loss;
    j["val_loss_delta"] = after.loss - before.loss;
    std::cout << "validation loss: " << before.loss << " (fp32) -> " << after.loss << " (" << nn::to_string(fmt)
              << "), delta " << after.loss - before.loss << " over " << before.tokens << " tokens\n";
  }
  std::cout << "wrote " << out << "\n" << j.dump() << std::endl;
  return j;
}


}  // namespace ultramem::infer
