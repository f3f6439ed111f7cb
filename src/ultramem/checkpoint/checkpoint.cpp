#include "ultramem/checkpoint/checkpoint.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <zlib.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <mutex>
#include <set>
#include <stdexcept>
#include <utility>

#include "ultramem/io/safetensors.h"

namespace ultramem::checkpoint {
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
  // zlib returns its initial value (0) for a null buffer whatever `crc` is: an empty tensor (null data)
  // would restart the sum and leave everything before it unprotected.
  if (n == 0) return crc;
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
//
// legacy: the sum as written before the fix above, which restarted at an empty tensor with null data;
// files holding an empty tensor written then are still accepted (read_verified).
std::string checksum(const NamedTensors& tensors, const std::map<std::string, std::string>& meta,
                     bool legacy = false) {
  uint32_t crc = static_cast<uint32_t>(::crc32_z(0L, Z_NULL, 0));
  for (const auto& [name, t0] : tensors) {
    const at::Tensor t = t0.contiguous();
    std::string shape;
    for (int64_t d = 0; d < t.dim(); ++d) shape += (d ? "," : "") + std::to_string(t.size(d));
    crc = crc_update(crc, name);
    crc = crc_update(crc, dtype_name(t.scalar_type()));
    crc = crc_update(crc, shape);
    const size_t bytes = static_cast<size_t>(t.numel() * t.element_size());
    crc = legacy && bytes == 0 ? static_cast<uint32_t>(::crc32_z(crc, static_cast<const Bytef*>(t.data_ptr()), 0))
                               : crc_update(crc, t.data_ptr(), bytes);
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

namespace {

// Writes `tensors` (file names: "model.<name>", "optim.<name>...", "rng.cpu") with the metadata of
// `options` (its tensor selection fields are the caller's business), then, for a one-file checkpoint,
// removes the shard files of earlier sharded saves of the same stem: none of them is referenced any more.
void write_checkpoint_file(const std::string& path, NamedTensors tensors, const nlohmann::json& model_config,
                           const CheckpointWriteOptions& options) {
  // Tensors whose size is a multiple of 64 bytes first: each of them then starts 64-byte aligned in the
  // file (io::kSafetensorsAlignment), so large tables can be memory-mapped (infer/model_loading.h).
  std::stable_partition(tensors.begin(), tensors.end(), [](const auto& nt) {
    const uint64_t bytes = uint64_t(nt.second.numel()) * nt.second.element_size();
    return bytes > 0 && bytes % io::kSafetensorsAlignment == 0;
  });

  std::map<std::string, std::string> meta;
  for (const auto& [k, v] : options.metadata) meta[k] = v;
  meta["format"] = kCheckpointFormat;
  meta["format_version"] = std::to_string(kCheckpointVersion);
  meta["model_config"] = model_config.dump();
  if (!options.train_config.is_null()) meta["train_config"] = options.train_config.dump();
  if (!options.trainer_state.is_null()) meta["trainer_state"] = options.trainer_state.dump();
  if (!options.shards.is_null()) meta["shards"] = options.shards.dump();
  meta["checksum"] = checksum(tensors, meta);
  try {
    io::save_safetensors(path, tensors, meta);
  } catch (const std::exception& e) {
    fail(path, std::string("write failed: ") + e.what());
  }
  if (options.shards.is_null()) remove_shard_files(path);
}

}  // namespace

void save_checkpoint(const std::string& path, const torch::nn::Module& model,
                     const nlohmann::json& model_config, const CheckpointWriteOptions& options) {
  NamedTensors tensors;
  for (auto& [name, t] : model_tensors(model)) {
    if (options.exclude.count(kModelPrefix + name)) continue;
    if (t.is_sparse()) fail(path, "model tensor '" + name + "' is sparse");
    tensors.emplace_back(kModelPrefix + name, t.detach().cpu().contiguous());
  }
  if (options.optim) {
    for (auto& [name, t] : *options.optim) {
      if (options.exclude.count(kOptimPrefix + name)) continue;
      tensors.emplace_back(kOptimPrefix + name, t.detach().cpu().contiguous());
    }
  }
  if (options.rng) tensors.emplace_back(kRngName, get_rng_state().contiguous());
  write_checkpoint_file(path, std::move(tensors), model_config, options);
}

void save_checkpoint(const std::string& path, const Checkpoint& ckpt) {
  NamedTensors tensors;
  for (const auto& [name, t] : ckpt.model) tensors.emplace_back(kModelPrefix + name, t.contiguous());
  for (const auto& [name, t] : ckpt.optim) tensors.emplace_back(kOptimPrefix + name, t.contiguous());
  if (ckpt.rng.defined()) tensors.emplace_back(kRngName, ckpt.rng.contiguous());
  CheckpointWriteOptions o;
  o.train_config = ckpt.train_config;
  o.trainer_state = ckpt.trainer_state;
  for (const auto& [k, v] : ckpt.metadata)
    if (k != "format" && k != "format_version" && k != "checksum" && k != "shards" && k != "model_config" &&
        k != "train_config" && k != "trainer_state")
      o.metadata[k] = v;
  write_checkpoint_file(path, std::move(tensors), ckpt.model_config, o);
}

std::string checkpoint_stem(const std::string& path) {
  std::string name = std::filesystem::path(path).filename().string();
  const std::string suffix = kCheckpointSuffix;
  if (name.size() > suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0)
    name.resize(name.size() - suffix.size());
  return name;
}

std::string shard_file_name(const std::string& stem, int64_t step, const std::string& token, int64_t rank,
                            int64_t world) {
  return stem + ".step" + std::to_string(step) + "." + token + ".rank" + std::to_string(rank) + "-of-" +
         std::to_string(world) + kCheckpointSuffix;
}

bool is_shard_file_of(const std::string& stem, const std::string& name) {
  const std::string prefix = stem + ".step", suffix = kCheckpointSuffix;
  return name.compare(0, prefix.size(), prefix) == 0 && name.size() > prefix.size() + suffix.size() &&
         name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0 &&
         name.find(".rank", prefix.size()) != std::string::npos;
}

void remove_shard_files(const std::string& path) {
  const auto dir = std::filesystem::path(path).parent_path();
  const std::string stem = checkpoint_stem(path);
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(dir.empty() ? "." : dir, ec))
    if (is_shard_file_of(stem, entry.path().filename().string())) std::filesystem::remove(entry.path(), ec);
}

namespace {

// A safetensors file of this format family, structure, format name, version and checksum verified.
struct VerifiedFile {
  std::map<std::string, std::string> meta;
  NamedTensors tensors;
};

// The metadata entry `key`; its absence is an error naming the file.
const std::string& need_meta(const std::string& path, const std::map<std::string, std::string>& meta, const char* key) {
  auto it = meta.find(key);
  if (it == meta.end()) fail(path, std::string("metadata '") + key + "' is missing (not an ultramem checkpoint?)");
  return it->second;
}

// Format name and version of a file's metadata.
void check_format(const std::string& path, const std::map<std::string, std::string>& meta, const char* format) {
  const std::string& name = need_meta(path, meta, "format");
  if (name != format) fail(path, "format is '" + name + "', expected '" + format + "'");
  const std::string& version = need_meta(path, meta, "format_version");
  if (version != std::to_string(kCheckpointVersion))
    fail(path, "format version " + version + " is not supported (this build reads " +
                   std::to_string(kCheckpointVersion) + ")");
}

VerifiedFile read_verified(const std::string& path, const char* format) {
  VerifiedFile f;
  try {
    f.tensors = io::load_safetensors(path, &f.meta);
  } catch (const std::exception& e) {
    fail(path, std::string("cannot read (missing, truncated or corrupt file): ") + e.what());
  }
  check_format(path, f.meta, format);
  const std::string stored = need_meta(path, f.meta, "checksum");
  const std::string actual = checksum(f.tensors, f.meta);
  bool has_empty = false;
  for (const auto& nt : f.tensors) has_empty = has_empty || nt.second.numel() == 0;
  if (stored != actual && !(has_empty && stored == checksum(f.tensors, f.meta, /*legacy=*/true)))
    fail(path, "checksum mismatch (stored " + stored + ", computed " + actual + "): the file is corrupt");
  return f;
}

json parse_meta(const std::string& path, const std::map<std::string, std::string>& meta, const char* key) {
  auto it = meta.find(key);
  if (it == meta.end()) return json();
  try {
    return json::parse(it->second);
  } catch (const json::parse_error& e) {
    fail(path, std::string("metadata '") + key + "' is not valid JSON: " + e.what());
  }
}

// A checkpoint's metadata: the model config (required), train config and trainer state (optional).
Checkpoint checkpoint_of(const std::string& path, const std::map<std::string, std::string>& meta) {
  Checkpoint c;
  c.path = path;
  c.metadata = meta;
  c.model_config = parse_meta(path, meta, "model_config");
  if (c.model_config.is_null()) fail(path, "metadata 'model_config' is missing (not an ultramem checkpoint?)");
  c.train_config = parse_meta(path, meta, "train_config");
  c.trainer_state = parse_meta(path, meta, "trainer_state");
  return c;
}

// t [R, C, ...] cut to columns r of dim 1 (a copy, so the whole tensor can be freed).
at::Tensor cut_columns(const std::string& path, const std::string& name, const at::Tensor& t, const ColumnRange& r) {
  if (t.dim() < 2) fail(path, "tensor '" + name + "' has no column dimension to select from");
  if (r.begin < 0 || r.end > t.size(1) || r.begin > r.end)
    fail(path, "columns [" + std::to_string(r.begin) + ", " + std::to_string(r.end) + ") of tensor '" + name +
                   "' are outside its " + std::to_string(t.size(1)) + " columns");
  return t.narrow(1, r.begin, r.end - r.begin).contiguous().clone();
}

void place(const std::string& path, Checkpoint& c, const std::string& name, at::Tensor t) {
  const std::string mp = kModelPrefix, op = kOptimPrefix;
  if (name.compare(0, mp.size(), mp) == 0) {
    c.model[name.substr(mp.size())] = std::move(t);
  } else if (name.compare(0, op.size(), op) == 0) {
    c.optim[name.substr(op.size())] = std::move(t);
  } else if (name == kRngName) {
    c.rng = std::move(t);
  } else {
    fail(path, "unexpected tensor '" + name + "'");
  }
}

// The tensors listed in a sharded checkpoint's manifest, read from the shard files next to `path`.
void read_shards(const std::string& path, const json& manifest, const CheckpointReadOptions& options,
                 std::set<std::string>& selected, Checkpoint& c) {
  auto bad = [&](const std::string& what) { fail(path, "shard manifest: " + what); };
  if (!manifest.is_object() || !manifest.contains("world") || !manifest.at("world").is_number_integer() ||
      !manifest.contains("files") || !manifest.at("files").is_array() || !manifest.contains("tensors") ||
      !manifest.at("tensors").is_object())
    bad("expected an object with 'world', 'files' and 'tensors'");
  const int64_t world = manifest.at("world").get<int64_t>();
  const json& files = manifest.at("files");
  if (world < 1 || static_cast<int64_t>(files.size()) != world) bad("'files' must list one file per rank");
  c.shard_world = world;
  const std::filesystem::path dir = std::filesystem::path(path).parent_path();
  // Every entry names a plain file next to the main file: nothing in the manifest may point elsewhere.
  for (size_t j = 0; j < files.size(); ++j) {
    const json& e = files[j];
    if (!e.is_object() || !e.contains("file") || !e.at("file").is_string() || !e.contains("checksum") ||
        !e.at("checksum").is_string())
      bad("file entry " + std::to_string(j) + " must be {\"file\": name, \"checksum\": string}");
    const std::string name = e.at("file").get<std::string>();
    if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos ||
        name.find('\\') != std::string::npos || name.find('\0') != std::string::npos)
      bad("file entry " + std::to_string(j) + " '" + name +
          "' is not a plain file name next to the checkpoint (no folders, no '..')");
  }
  std::map<int64_t, VerifiedFile> loaded;
  auto shard = [&](int64_t j) -> VerifiedFile& {
    auto it = loaded.find(j);
    if (it != loaded.end()) return it->second;
    const json& e = files.at(static_cast<size_t>(j));
    const std::string fp = (dir / e.at("file").get<std::string>()).string();
    if (!std::filesystem::exists(fp))
      fail(path, "shard file " + fp + " of rank " + std::to_string(j) + " is missing (a sharded checkpoint needs "
                 "every rank's file; copy them from the machines that wrote them)");
    VerifiedFile f = read_verified(fp, kCheckpointShardFormat);
    if (f.meta.at("checksum") != e.at("checksum").get<std::string>())
      fail(fp, "checksum " + f.meta.at("checksum") + " differs from " + e.at("checksum").get<std::string>() +
                   " recorded by " + path + ": a shard of another save (stale or foreign)");
    const json info = parse_meta(fp, f.meta, "shard");
    if (!info.is_object() || info.value("rank", int64_t(-1)) != j || info.value("world", int64_t(-1)) != world)
      fail(fp, "is not shard " + std::to_string(j) + " of " + std::to_string(world));
    return loaded.emplace(j, std::move(f)).first->second;
  };
  auto tensor_in = [&](int64_t j, const std::string& name) -> const at::Tensor& {
    for (const auto& [n, t] : shard(j).tensors)
      if (n == name) return t;
    fail(path, "shard file of rank " + std::to_string(j) + " lacks tensor '" + name + "'");
  };
  for (const auto& [name, e] : manifest.at("tensors").items()) {
    if (!e.is_object() || !e.contains("shape") || !e.contains("columns") || !e.at("columns").is_array() ||
        static_cast<int64_t>(e.at("columns").size()) != world)
      bad("entry of '" + name + "'");
    const auto shape = e.at("shape").get<std::vector<int64_t>>();
    if (shape.size() < 2) bad("'" + name + "' is not split along a column dimension");
    for (const int64_t d : shape)
      if (d < 0) bad("'" + name + "' has a negative size in its shape");
    // The ranks' column ranges tile [0, shape[1]) in rank order, as the writer lays them out; checked before
    // any arithmetic on them (a range from a hostile file could overflow it).
    std::vector<std::pair<int64_t, int64_t>> ranges;
    for (int64_t j = 0; j < world; ++j) {
      const auto cols = e.at("columns").at(static_cast<size_t>(j)).get<std::vector<int64_t>>();
      const int64_t start = j == 0 ? 0 : ranges.back().second;
      if (cols.size() != 2 || cols[0] != start || cols[1] < cols[0] || cols[1] > shape[1])
        bad("columns of '" + name + "' for rank " + std::to_string(j) + " must be [" + std::to_string(start) +
            ", end) with end <= " + std::to_string(shape[1]) + " (the ranks' ranges tile the columns in order)");
      ranges.emplace_back(cols[0], cols[1]);
    }
    if (ranges.back().second != shape[1])
      bad("columns of '" + name + "' end at " + std::to_string(ranges.back().second) + ", not at its " +
          std::to_string(shape[1]) + " columns");
    ColumnRange want{0, shape[1]};
    if (auto it = options.columns.find(name); it != options.columns.end()) {
      want = it->second;
      selected.insert(name);
      if (want.begin < 0 || want.end > shape[1] || want.begin > want.end)
        fail(path, "columns [" + std::to_string(want.begin) + ", " + std::to_string(want.end) + ") of tensor '" +
                       name + "' are outside its " + std::to_string(shape[1]) + " columns");
    }
    std::vector<at::Tensor> parts;
    for (int64_t j = 0; j < world; ++j) {
      const auto [col_begin, col_end] = ranges[static_cast<size_t>(j)];
      const int64_t lo = std::max(want.begin, col_begin), hi = std::min(want.end, col_end);
      if (lo >= hi) continue;
      const at::Tensor& t = tensor_in(j, name);
      std::vector<int64_t> expect = shape;
      expect[1] = col_end - col_begin;
      if (t.sizes().vec() != expect)
        fail(path, "tensor '" + name + "' in the shard of rank " + std::to_string(j) + " is " + shape_str(t.sizes()) +
                       ", the manifest says " + shape_str(expect));
      parts.push_back(t.narrow(1, lo - col_begin, hi - lo));
    }
    at::Tensor whole;
    if (parts.empty()) {
      std::vector<int64_t> empty_shape = shape;
      empty_shape[1] = 0;
      whole = at::empty(empty_shape, tensor_in(0, name).options());
    } else {
      whole = at::cat(parts, 1).contiguous();
    }
    place(path, c, name, std::move(whole));
  }
  if (options.world == world && options.rank >= 0 && options.rank < world) {
    for (const auto& [n, t] : shard(options.rank).tensors)
      if (n == kRngName) c.rng = t;
  }
}

}  // namespace

Checkpoint read_checkpoint(const std::string& path) { return read_checkpoint(path, CheckpointReadOptions{}); }

Checkpoint read_checkpoint(const std::string& path, const CheckpointReadOptions& options) {
  VerifiedFile f = read_verified(path, kCheckpointFormat);
  Checkpoint c = checkpoint_of(path, f.meta);
  std::set<std::string> selected;
  for (auto& [name, t] : f.tensors) {
    auto it = options.columns.find(name);
    if (it != options.columns.end()) {
      selected.insert(name);
      place(path, c, name, cut_columns(path, name, t, it->second));
    } else {
      place(path, c, name, t);
    }
  }
  f.tensors.clear();
  const json manifest = parse_meta(path, f.meta, "shards");
  if (!manifest.is_null()) read_shards(path, manifest, options, selected, c);
  for (const auto& [name, r] : options.columns)
    if (!selected.count(name) && !options.skip_missing_columns) fail(path, "has no tensor '" + name + "' to select columns from");
  return c;
}

std::string save_checkpoint_shard(const std::string& path, const NamedTensors& tensors, const nlohmann::json& shard_info) {
  NamedTensors out;
  for (const auto& [name, t] : tensors) {
    if (t.is_sparse()) fail(path, "tensor '" + name + "' is sparse");
    out.emplace_back(name, t.detach().cpu().contiguous());
  }
  std::map<std::string, std::string> meta;
  meta["format"] = kCheckpointShardFormat;
  meta["format_version"] = std::to_string(kCheckpointVersion);
  meta["shard"] = shard_info.dump();
  meta["checksum"] = checksum(out, meta);
  try {
    io::save_safetensors(path, out, meta);
  } catch (const std::exception& e) {
    fail(path, std::string("write failed: ") + e.what());
  }
  return meta["checksum"];
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
    const at::Tensor& src = ckpt.model.at(name);
    if (dst.data_ptr() == src.data_ptr()) continue;  // already installed (e.g. a memory-mapped value table)
    dst.copy_(src);
  }
}

void load_model_weights(const std::string& path, torch::nn::Module& model, const nlohmann::json& model_config) {
  load_model_state(read_checkpoint(path), model, model_config);
}

Checkpoint map_checkpoint(const std::string& path, std::vector<std::string>* copied) {
  io::MappedSafetensors m;
  try {
    m = io::map_safetensors(path);
  } catch (const std::exception& e) {
    fail(path, std::string("cannot map (missing, truncated or corrupt file): ") + e.what());
  }
  check_format(path, m.metadata, kCheckpointFormat);
  if (m.metadata.count("shards")) fail(path, "a sharded checkpoint cannot be memory-mapped; load it without --mmap");
  Checkpoint c = checkpoint_of(path, m.metadata);
  const std::string mp = kModelPrefix;
  for (auto& [name, t] : m.tensors)
    if (name.compare(0, mp.size(), mp) == 0) c.model[name.substr(mp.size())] = t;  // optimizer state: untouched
  if (copied)
    for (const auto& name : m.copied)
      if (name.compare(0, mp.size(), mp) == 0) copied->push_back(name.substr(mp.size()));
  return c;
}

}  // namespace ultramem::checkpoint
