#include "ultramem/train/train_config.h"

#include "ultramem/io/json_file.h"

#include <cmath>
#include <fstream>
#include <functional>
#include <set>
#include <nlohmann/json.hpp>
#include <stdexcept>

namespace ultramem::train {
namespace {

using nlohmann::json;

[[noreturn]] void bad(const std::string& field, const std::string& what) {
  throw std::invalid_argument("TrainConfig." + field + ": " + what);
}

// Reads one field with a type check that names the key.
template <typename T>
void read(const json& j, const std::string& key, T& out) {
  const json& v = j.at(key);
  if constexpr (std::is_same_v<T, bool>) {
    if (!v.is_boolean()) bad(key, "expected a boolean, got " + v.dump());
    out = v.get<bool>();
  } else if constexpr (std::is_same_v<T, std::string>) {
    if (!v.is_string()) bad(key, "expected a string, got " + v.dump());
    out = v.get<std::string>();
  } else if constexpr (std::is_floating_point_v<T>) {
    if (!v.is_number()) bad(key, "expected a number, got " + v.dump());
    out = v.get<T>();
  } else if constexpr (std::is_unsigned_v<T>) {
    if (!v.is_number_integer() || (v.is_number_integer() && !v.is_number_unsigned() && v.get<int64_t>() < 0))
      bad(key, "expected a non-negative integer, got " + v.dump());
    out = v.get<T>();
  } else {
    if (!v.is_number_integer()) bad(key, "expected an integer, got " + v.dump());
    out = v.get<T>();
  }
}

// Applies fn(key, field) to every field, in declaration order (one list for reading and writing).
template <typename Config, typename Fn>
void for_each_field(Config& c, Fn&& fn) {
  fn("lr", c.lr);
  fn("min_lr_ratio", c.min_lr_ratio);
  fn("warmup_steps", c.warmup_steps);
  fn("steps", c.steps);
  fn("batch_size", c.batch_size);
  fn("seq_len", c.seq_len);
  fn("grad_accum", c.grad_accum);
  fn("grad_clip", c.grad_clip);
  fn("weight_decay", c.weight_decay);
  fn("memory_weight_decay", c.memory_weight_decay);
  fn("beta1", c.beta1);
  fn("beta2", c.beta2);
  fn("eps", c.eps);
  fn("value_lr_T", c.value_lr_T);
  fn("value_lr_decay_steps", c.value_lr_decay_steps);
  fn("value_sparse_adam", c.value_sparse_adam);
  fn("expert_lr_T", c.expert_lr_T);
  fn("expert_lr_decay_steps", c.expert_lr_decay_steps);
  fn("seed", c.seed);
  fn("eval_every", c.eval_every);
  fn("eval_batches", c.eval_batches);
  fn("log_every", c.log_every);
  fn("checkpoint_every", c.checkpoint_every);
  fn("keep_best", c.keep_best);
  fn("out_dir", c.out_dir);
}

}  // namespace

int64_t TrainConfig::resolved_warmup_steps() const {
  return warmup_steps >= 0 ? warmup_steps : std::max<int64_t>(1, steps / 100);
}

int64_t TrainConfig::resolved_expert_lr_decay_steps() const {
  return expert_lr_decay_steps >= 0 ? expert_lr_decay_steps : steps;
}

int64_t TrainConfig::resolved_value_lr_decay_steps() const {
  return value_lr_decay_steps >= 0 ? value_lr_decay_steps : steps;
}

void TrainConfig::validate() const {
  auto finite = [](double x) { return std::isfinite(x); };
  if (!(finite(lr) && lr > 0)) bad("lr", "must be finite and > 0, got " + std::to_string(lr));
  if (!(min_lr_ratio >= 0 && min_lr_ratio <= 1)) bad("min_lr_ratio", "must be in [0, 1]");
  if (steps < 1) bad("steps", "must be >= 1, got " + std::to_string(steps));
  if (warmup_steps < -1 || warmup_steps > steps)
    bad("warmup_steps", "must be -1 (auto) or in [0, steps], got " + std::to_string(warmup_steps));
  if (batch_size < 1) bad("batch_size", "must be >= 1, got " + std::to_string(batch_size));
  if (seq_len < 1) bad("seq_len", "must be >= 1, got " + std::to_string(seq_len));
  if (grad_accum < 1) bad("grad_accum", "must be >= 1, got " + std::to_string(grad_accum));
  if (!(finite(grad_clip) && grad_clip >= 0)) bad("grad_clip", "must be finite and >= 0 (0 disables)");
  if (!(finite(weight_decay) && weight_decay >= 0)) bad("weight_decay", "must be finite and >= 0");
  if (!(finite(memory_weight_decay) && memory_weight_decay >= 0))
    bad("memory_weight_decay", "must be finite and >= 0");
  if (!(beta1 >= 0 && beta1 < 1)) bad("beta1", "must be in [0, 1)");
  if (!(beta2 >= 0 && beta2 < 1)) bad("beta2", "must be in [0, 1)");
  if (!(finite(eps) && eps > 0)) bad("eps", "must be finite and > 0");
  if (!(finite(value_lr_T) && value_lr_T >= 1))
    bad("value_lr_T", "must be finite and >= 1 (the multiplier never goes below 1), got " +
                          std::to_string(value_lr_T));
  if (value_lr_decay_steps < -1) bad("value_lr_decay_steps", "must be -1 (all steps) or >= 0");
  if (!(finite(expert_lr_T) && expert_lr_T >= 1))
    bad("expert_lr_T", "must be finite and >= 1 (the multiplier never goes below 1), got " + std::to_string(expert_lr_T));
  if (expert_lr_decay_steps < -1) bad("expert_lr_decay_steps", "must be -1 (all steps) or >= 0");
  if (eval_every < 0) bad("eval_every", "must be >= 0 (0: never)");
  if (eval_batches < 0) bad("eval_batches", "must be >= 0");
  if (log_every < 0) bad("log_every", "must be >= 0 (0: never)");
  if (checkpoint_every < 0) bad("checkpoint_every", "must be >= 0 (0: at the end only)");
  if (out_dir.empty()) bad("out_dir", "must not be empty");
  // Upper bounds: far above any run on one machine, low enough that step and token counts stay in int64_t.
  auto at_most = [](const char* field, int64_t v, int64_t limit) {
    if (v > limit) bad(field, "must be <= " + std::to_string(limit) + ", got " + std::to_string(v));
  };
  at_most("steps", steps, int64_t(1) << 40);
  at_most("batch_size", batch_size, int64_t(1) << 20);
  at_most("seq_len", seq_len, int64_t(1) << 22);
  at_most("grad_accum", grad_accum, int64_t(1) << 20);
  at_most("eval_batches", eval_batches, int64_t(1) << 20);
  if (double(batch_size) * double(seq_len) * double(grad_accum) > double(int64_t(1) << 40))
    bad("batch_size", "batch_size x seq_len x grad_accum = " +
                          std::to_string(double(batch_size) * double(seq_len) * double(grad_accum)) +
                          " tokens per step; the limit is 2^40");
}

TrainConfig train_config_from_json(const nlohmann::json& j) {
  if (!j.is_object()) throw std::invalid_argument("TrainConfig: expected a JSON object, got " + j.dump());
  TrainConfig c;
  std::set<std::string> known;
  for_each_field(c, [&](const char* key, auto& field) {
    known.insert(key);
    if (j.contains(key)) read(j, key, field);
  });
  for (const auto& [key, value] : j.items())
    if (!known.count(key)) throw std::invalid_argument("TrainConfig: unknown key '" + key + "'");
  c.validate();
  return c;
}

nlohmann::json train_config_to_json(const TrainConfig& c) {
  json j = json::object();
  TrainConfig copy = c;
  for_each_field(copy, [&](const char* key, auto& field) { j[key] = field; });
  return j;
}

TrainConfig load_train_config(const std::string& path) {
  const json j = io::read_json_file(path);
  try {
    return train_config_from_json(j);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(path + ": " + e.what());
  }
}

const std::vector<std::string>& trajectory_keys() {
  static const std::vector<std::string> keys = {
      "lr",         "min_lr_ratio", "warmup_steps",        "batch_size", "seq_len",
      "grad_accum", "grad_clip",    "weight_decay",        "memory_weight_decay",
      "beta1",      "beta2",        "eps",                 "value_lr_T", "value_lr_decay_steps",
      "value_sparse_adam",          "seed",         "expert_lr_T",         "expert_lr_decay_steps"};
  return keys;
}

}  // namespace ultramem::train
