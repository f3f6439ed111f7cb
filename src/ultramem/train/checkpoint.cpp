#include "ultramem/train/checkpoint.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <zlib.h>

#include <cstdio>
#include <mutex>
#include <set>
#include <stdexcept>
#include <utility>

#include "ultramem/io/safetensors.h"
#include "ultramem/train/optimizer.h"

namespace ultramem::train {
namespace {

using nlohmann::json;
using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

const char* kModelPrefix = "model.";
const char* kOptimPrefix = "optim.";
const char* kRngName = "rng.cpu";

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw std::runtime_error("checkpoint " + path + ": " + what);
}

// safetensors dtype names (the checksum covers them, so they are part of the format).
const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return "F64";
    case at::kFloat: return "F32";
    case at::kHalf: return "F16";
    case at::kBFloat16: return "BF16";
    case at::kLong: return "I64";
    case at::kInt: return "I32";
    case at::kShort: return "I16";
    case at::kChar: return "I8";
    case at::kByte: return "U8";
    case at::kBool: return "BOOL";
    default: return "?";
  }
}

uint32_t crc_update(uint32_t crc, const void* data, size_t n) {
  return static_cast<uint32_t>(::crc32_z(crc, static_cast<const Bytef*>(data), n));
}

uint32_t crc_update(uint32_t crc, const std::string& s) {
  // Strings are followed by a NUL separator so that field boundaries are part of the checksum.
  crc = crc_update(crc, s.data(), s.size());
  const char nul = '\0';
  return crc_update(crc, &nul, 1);
}

// CRC-32 (zlib) over, for every tensor in file order: name, dtype, shape ("2,3"), each NUL-terminated,
// then the raw little-endian bytes; then every metadata entry except "checksum" in key order as
// key NUL value NUL.
std::string checksum(const NamedTensors& tensors, const std::map<std::string, std::string>& meta) {
  uint32_t crc = static_cast<uint32_t>(::crc32_z(0L, Z_NULL, 0));
  for (const auto& [name, t0] : tensors) {
    const at::Tensor t = t0.contiguous();
    std::string shape;
    for (int64_t d = 0; d < t.dim(); ++d) shape += (d ? "," : "") + std::to_string(t.size(d));
    crc = crc_update(crc, name);
    crc = crc_update(crc, dtype_name(t.scalar_type()));
    crc = crc_update(crc, shape);
    crc = crc_update(crc, t.data_ptr(), static_cast<size_t>(t.numel() * t.element_size()));
  }
  for (const auto& [k, v] : meta) {
    if (k == "checksum") continue;
    crc = crc_update(crc, k);
    crc = crc_update(crc, v);
  }
  char buf[20];
  std::snprintf(buf, sizeof buf, "crc32:%08x", crc);
  return buf;
}

NamedTensors model_tensors(const torch::nn::Module& model) {
  NamedTensors out;
  for (const auto& p : model.named_parameters(true)) out.emplace_back(p.key(), p.value());
  for (const auto& b : model.named_buffers(true)) out.emplace_back(b.key(), b.value());
  return out;
}

std::string shape_str(at::IntArrayRef s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

void diff_rec(const json& a, const json& b, const std::string& prefix, std::vector<std::string>& out) {
  if (a.is_object() && b.is_object()) {
    std::set<std::string> keys;
    for (const auto& [k, v] : a.items()) keys.insert(k);
    for (const auto& [k, v] : b.items()) keys.insert(k);
    for (const auto& k : keys) {
      const std::string path = prefix.empty() ? k : prefix + "." + k;
      if (!a.contains(k)) {
        out.push_back(path + ": (absent) vs " + b.at(k).dump());
      } else if (!b.contains(k)) {
        out.push_back(path + ": " + a.at(k).dump() + " vs (absent)");
      } else {
        diff_rec(a.at(k), b.at(k), path, out);
      }
    }
    return;
  }
  if (a != b) out.push_back((prefix.empty() ? "(root)" : prefix) + ": " + a.dump() + " vs " + b.dump());
}

}  // namespace

torch::Tensor get_rng_state() {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}

void set_rng_state(const torch::Tensor& state) {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

std::vector<std::string> config_differences(const nlohmann::json& a, const nlohmann::json& b) {
  std::vector<std::string> out;
  diff_rec(a, b, "", out);
  return out;
}

void save_checkpoint(const std::string& path, const torch::nn::Module& model,
                     const nlohmann::json& model_config, const CheckpointWriteOptions& options) {
  NamedTensors tensors;
  for (auto& [name, t] : model_tensors(model)) {
    if (t.is_sparse()) fail(path, "model tensor '" + name + "' is sparse");
    tensors.emplace_back(kModelPrefix + name, t.detach().cpu().contiguous());
  }
  if (options.optimizer) {
    for (auto& [name, t] : options.optimizer->state_tensors())
      tensors.emplace_back(kOptimPrefix + name, t.detach().cpu().contiguous());
  }
  if (options.rng) tensors.emplace_back(kRngName, get_rng_state().contiguous());

  std::map<std::string, std::string> meta;
  meta["format"] = kCheckpointFormat;
  meta["format_version"] = std::to_string(kCheckpointVersion);
  meta["model_config"] = model_config.dump();
  if (!options.train_config.is_null()) meta["train_config"] = options.train_config.dump();
  if (!options.trainer_state.is_null()) meta["trainer_state"] = options.trainer_state.dump();
  meta["checksum"] = checksum(tensors, meta);
  try {
    io::save_safetensors(path, tensors, meta);
  } catch (const std::exception& e) {
    fail(path, std::string("write failed: ") + e.what());
  }
}

Checkpoint read_checkpoint(const std::string& path) {
  std::map<std::string, std::string> meta;
  NamedTensors tensors;
  try {
    tensors = io::load_safetensors(path, &meta);
  } catch (const std::exception& e) {
    fail(path, std::string("cannot read (missing, truncated or corrupt file): ") + e.what());
  }
  auto need = [&](const char* key) -> const std::string& {
    auto it = meta.find(key);
    if (it == meta.end()) fail(path, std::string("metadata '") + key + "' is missing (not an ultramem checkpoint?)");
    return it->second;
  };
  if (need("format") != kCheckpointFormat)
    fail(path, "format is '" + meta["format"] + "', expected '" + kCheckpointFormat + "'");
  if (need("format_version") != std::to_string(kCheckpointVersion))
    fail(path, "format version " + meta["format_version"] + " is not supported (this build reads " +
                   std::to_string(kCheckpointVersion) + ")");
  const std::string stored = need("checksum");
  const std::string actual = checksum(tensors, meta);
  if (stored != actual)
    fail(path, "checksum mismatch (stored " + stored + ", computed " + actual + "): the file is corrupt");

  Checkpoint c;
  c.path = path;
  auto parse = [&](const char* key) -> json {
    auto it = meta.find(key);
    if (it == meta.end()) return json();
    try {
      return json::parse(it->second);
    } catch (const json::parse_error& e) {
      fail(path, std::string("metadata '") + key + "' is not valid JSON: " + e.what());
    }
  };
  c.model_config = parse("model_config");
  if (c.model_config.is_null()) need("model_config");
  c.train_config = parse("train_config");
  c.trainer_state = parse("trainer_state");
  const std::string mp = kModelPrefix, op = kOptimPrefix;
  for (auto& [name, t] : tensors) {
    if (name.compare(0, mp.size(), mp) == 0) {
      c.model[name.substr(mp.size())] = t;
    } else if (name.compare(0, op.size(), op) == 0) {
      c.optim[name.substr(op.size())] = t;
    } else if (name == kRngName) {
      c.rng = t;
    } else {
      fail(path, "unexpected tensor '" + name + "'");
    }
  }
  return c;
}

void load_model_state(const Checkpoint& ckpt, torch::nn::Module& model, const nlohmann::json& model_config) {
  const auto diffs = config_differences(ckpt.model_config, model_config);
  if (!diffs.empty()) {
    std::string msg = "model config differs from the model's (checkpoint vs model):";
    for (const auto& d : diffs) msg += "\n  " + d;
    fail(ckpt.path, msg);
  }
  const NamedTensors mine = model_tensors(model);
  std::set<std::string> names;
  std::vector<std::string> problems;
  for (const auto& [name, t] : mine) {
    names.insert(name);
    auto it = ckpt.model.find(name);
    if (it == ckpt.model.end()) {
      problems.push_back("missing tensor '" + name + "'");
    } else if (it->second.sizes() != t.sizes() || it->second.scalar_type() != t.scalar_type()) {
      problems.push_back("tensor '" + name + "' is " + shape_str(it->second.sizes()) + " " +
                         dtype_name(it->second.scalar_type()) + ", the model's is " + shape_str(t.sizes()) +
                         " " + dtype_name(t.scalar_type()));
    }
  }
  for (const auto& [name, t] : ckpt.model)
    if (!names.count(name)) problems.push_back("unexpected tensor '" + name + "'");
  if (!problems.empty()) {
    std::string msg = "does not match the model:";
    for (size_t i = 0; i < problems.size() && i < 20; ++i) msg += "\n  " + problems[i];
    if (problems.size() > 20) msg += "\n  ... (" + std::to_string(problems.size() - 20) + " more)";
    fail(ckpt.path, msg);
  }
  at::NoGradGuard no_grad;
  for (const auto& [name, t] : mine) {
    at::Tensor dst = t;
    dst.copy_(ckpt.model.at(name));
  }
}

void load_model_weights(const std::string& path, torch::nn::Module& model, const nlohmann::json& model_config) {
  load_model_state(read_checkpoint(path), model, model_config);
}

}  // namespace ultramem::train
