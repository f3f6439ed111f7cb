#include "ultramem/infer/value_tables.h"

#include <torch/torch.h>

#include <nlohmann/json.hpp>
#include <stdexcept>

#include "ultramem/checkpoint/checkpoint.h"

namespace ultramem::infer {

namespace {

// Calls fn(name, format, bytes, set_format) for every layer of type Layer with a value table.
template <typename Layer, typename Fn>
void for_each_table_of(torch::nn::Module& model, Fn& fn) {
  for (auto& [name, layer] : layers_of<Layer>(model))
    fn(name, layer->value_format(), layer->value_bytes(), [l = layer](nn::ValueFormat f) { l->set_value_format(f); });
}

// The same for every layer with a value table, UltraMem first.
template <typename Fn>
void for_each_table(torch::nn::Module& model, Fn&& fn) {
  for_each_table_of<nn::UltraMemImpl>(model, fn);
  for_each_table_of<nn::EngramImpl>(model, fn);
}

}  // namespace

void set_value_format(torch::nn::Module& model, nn::ValueFormat f) {
  for_each_table(model, [&](const std::string& name, nn::ValueFormat, int64_t, const auto& set) {
    try {
      set(f);
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument(name + ": " + e.what());
    } catch (const std::logic_error& e) {
      throw std::logic_error(name + ": " + e.what());
    }
  });
}

void set_key_format(torch::nn::Module& model, nn::ValueFormat f) {
  for (auto& [name, layer] : ultramem_layers(model)) layer->set_key_format(f);
}

nn::ValueFormat key_format(torch::nn::Module& model) {
  const auto layers = ultramem_layers(model);
  return layers.empty() ? nn::ValueFormat::kFloat32 : layers.front().second->key_format();
}

nn::ValueFormat value_format(torch::nn::Module& model) {
  std::string first;
  nn::ValueFormat f = nn::ValueFormat::kFloat32;
  for_each_table(model, [&](const std::string& name, nn::ValueFormat g, int64_t, const auto&) {
    if (first.empty()) {
      first = name;
      f = g;
    } else if (g != f) {
      throw std::logic_error("the memory layers store their values in different formats (" + first + ": " +
                             nn::to_string(f) + ", " + name + ": " + nn::to_string(g) + ")");
    }
  });
  return f;
}

int64_t value_bytes(torch::nn::Module& model) {
  int64_t b = 0;
  for_each_table(model, [&](const std::string&, nn::ValueFormat, int64_t bytes, const auto&) { b += bytes; });
  return b;
}

void save_weights(const std::string& path, nn::TransformerImpl& model, const nlohmann::json& model_config,
                  const nlohmann::json& train_config) {
  checkpoint::CheckpointWriteOptions o;
  o.rng = false;
  o.train_config = train_config;
  o.metadata[kValueFormatKey] = nn::to_string(value_format(model));
  o.metadata[kKeyFormatKey] = nn::to_string(key_format(model));
  if (model.weight_format() != nn::ValueFormat::kFloat32)
    o.metadata[kWeightFormatKey] = nn::to_string(model.weight_format());
  checkpoint::save_checkpoint(path, model, model_config, o);
}

}  // namespace ultramem::infer
