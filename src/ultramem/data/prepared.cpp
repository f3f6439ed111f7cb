#include "ultramem/data/prepared.h"

#include <sys/stat.h>

#include <nlohmann/json.hpp>
#include <stdexcept>

#include "ultramem/io/atomic_file.h"
#include "ultramem/data/hash.h"
#include "ultramem/data/shard.h"
#include "ultramem/data/tokenizer.h"

namespace ultramem::data {
namespace {

using ordered_json = nlohmann::ordered_json;

std::string join(const std::string& dir, const std::string& name) {
  if (dir.empty()) return name;
  return dir.back() == '/' ? dir + name : dir + "/" + name;
}

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw std::runtime_error("prepared data: " + path + ": " + what);
}

// Field `key` of object `j`, which must exist and satisfy `ok`.
template <typename Pred>
const ordered_json& field(const ordered_json& j, const char* key, const std::string& where, const std::string& path,
                          Pred ok, const char* expected) {
  if (!j.is_object() || !j.contains(key)) fail(path, "missing field \"" + where + key + "\"");
  const ordered_json& v = j.at(key);
  if (!ok(v)) fail(path, "field \"" + where + key + "\" must be " + expected);
  return v;
}

int64_t count_field(const ordered_json& j, const char* key, const std::string& where, const std::string& path) {
  const auto& v = field(
      j, key, where, path, [](const ordered_json& x) { return x.is_number_integer() && x.get<int64_t>() >= 0; },
      "a non-negative integer");
  return v.get<int64_t>();
}

std::string string_field(const ordered_json& j, const char* key, const std::string& where, const std::string& path) {
  return field(j, key, where, path, [](const ordered_json& x) { return x.is_string(); }, "a string").get<std::string>();
}

const ordered_json& object_field(const ordered_json& j, const char* key, const std::string& where,
                                 const std::string& path) {
  return field(j, key, where, path, [](const ordered_json& x) { return x.is_object(); }, "an object");
}

SplitStats read_split(const ordered_json& splits, const char* name, const std::string& expected_file,
                      const std::string& path) {
  const std::string where = std::string("splits.") + name + ".";
  const ordered_json& s = object_field(splits, name, "splits.", path);
  if (string_field(s, "file", where, path) != expected_file)
    fail(path, "field \"" + where + "file\" must be \"" + expected_file + "\"");
  SplitStats out;
  out.documents = count_field(s, "documents", where, path);
  out.tokens = count_field(s, "tokens", where, path);
  out.bytes = count_field(s, "bytes", where, path);
  return out;
}

ordered_json split_json(const SplitStats& s, const char* file) {
  ordered_json j = ordered_json::object();
  j["file"] = file;
  j["documents"] = s.documents;
  j["tokens"] = s.tokens;
  j["bytes"] = s.bytes;
  return j;
}

}  // namespace

PreparedData load_prepared(const std::string& dir) {
  PreparedData d;
  d.dir = dir;
  d.manifest_path = join(dir, "manifest.json");
  d.tokenizer_path = join(dir, "tokenizer.model");
  d.train_path = join(dir, "train.bin");
  d.val_path = join(dir, "val.bin");
  const std::string& mpath = d.manifest_path;

  struct stat st;
  if (::stat(mpath.c_str(), &st) != 0)
    throw std::runtime_error("prepared data: " + dir + ": no manifest.json (data not prepared): run `ultramem prepare` first");
  ordered_json m;
  try {
    m = ordered_json::parse(io::read_file(mpath));
  } catch (const ordered_json::exception& e) {
    fail(mpath, std::string("not valid JSON: ") + e.what());
  }
  if (!m.is_object()) fail(mpath, "not a JSON object");
  if (string_field(m, "format", "", mpath) != "ultramem-prepared") fail(mpath, "field \"format\" must be \"ultramem-prepared\"");
  const int64_t version = count_field(m, "format_version", "", mpath);
  if (version != kPreparedFormatVersion)
    fail(mpath, "format_version " + std::to_string(version) + " is not supported (expected " +
                    std::to_string(kPreparedFormatVersion) + "): run `ultramem prepare` again");
  d.vocab_size = count_field(m, "vocab_size", "", mpath);
  d.bos_id = static_cast<int32_t>(count_field(m, "bos_id", "", mpath));
  d.eos_id = static_cast<int32_t>(count_field(m, "eos_id", "", mpath));

  const ordered_json& opt = object_field(m, "options", "", mpath);
  d.input = string_field(opt, "input", "options.", mpath);
  d.requested_vocab_size = count_field(opt, "vocab_size", "options.", mpath);
  d.val_fraction = field(opt, "val_fraction", "options.", mpath, [](const ordered_json& x) { return x.is_number(); },
                         "a number").get<double>();
  d.seed = field(opt, "seed", "options.", mpath,
                 [](const ordered_json& x) { return x.is_number_unsigned() || (x.is_number_integer() && x.get<int64_t>() >= 0); },
                 "a non-negative integer").get<uint64_t>();

  const ordered_json& tok = object_field(m, "tokenizer", "", mpath);
  if (string_field(tok, "file", "tokenizer.", mpath) != "tokenizer.model")
    fail(mpath, "field \"tokenizer.file\" must be \"tokenizer.model\"");
  d.tokenizer_hash = string_field(tok, "fnv1a64", "tokenizer.", mpath);
  d.tokenizer_settings = object_field(tok, "settings", "tokenizer.", mpath).dump();

  const ordered_json& in = object_field(m, "input", "", mpath);
  d.input_fingerprint = string_field(in, "fingerprint", "input.", mpath);
  d.input_files = static_cast<uint64_t>(count_field(in, "files", "input.", mpath));

  const ordered_json& splits = object_field(m, "splits", "", mpath);
  d.train = read_split(splits, "train", "train.bin", mpath);
  d.val = read_split(splits, "val", "val.bin", mpath);

  // The files named by the manifest.
  if (::stat(d.tokenizer_path.c_str(), &st) != 0) fail(d.tokenizer_path, "missing: run `ultramem prepare` again");
  const std::string model_bytes = io::read_file(d.tokenizer_path);
  if (hex64(fnv1a64(model_bytes)) != d.tokenizer_hash)
    fail(d.tokenizer_path, "content does not match the manifest's hash (changed after prepare): run `ultramem prepare` again");
  const Tokenizer tokenizer = Tokenizer::load(d.tokenizer_path);
  if (tokenizer.vocab_size() != d.vocab_size)
    fail(d.tokenizer_path, "vocab_size " + std::to_string(tokenizer.vocab_size()) + " differs from the manifest's " +
                               std::to_string(d.vocab_size));
  if (tokenizer.bos_id() != d.bos_id || tokenizer.eos_id() != d.eos_id)
    fail(d.tokenizer_path, "BOS/EOS ids differ from the manifest's");
  ShardReadOptions ro;
  ro.expected_vocab_size = d.vocab_size;
  for (const auto& [path, stats] : {std::pair<const std::string&, const SplitStats&>{d.train_path, d.train},
                                    std::pair<const std::string&, const SplitStats&>{d.val_path, d.val}}) {
    const TokenShard shard(path, ro);
    if (shard.size() != stats.tokens)
      fail(path, "holds " + std::to_string(shard.size()) + " tokens but the manifest says " +
                     std::to_string(stats.tokens));
  }
  return d;
}

void write_manifest(const PreparedData& d) {
  ordered_json m = ordered_json::object();
  m["format"] = "ultramem-prepared";
  m["format_version"] = kPreparedFormatVersion;
  m["vocab_size"] = d.vocab_size;
  m["bos_id"] = d.bos_id;
  m["eos_id"] = d.eos_id;
  ordered_json opt = ordered_json::object();
  opt["input"] = d.input;
  opt["vocab_size"] = d.requested_vocab_size;
  opt["val_fraction"] = d.val_fraction;
  opt["seed"] = d.seed;
  m["options"] = std::move(opt);
  ordered_json tok = ordered_json::object();
  tok["file"] = "tokenizer.model";
  tok["fnv1a64"] = d.tokenizer_hash;
  tok["settings"] = ordered_json::parse(d.tokenizer_settings);
  m["tokenizer"] = std::move(tok);
  ordered_json in = ordered_json::object();
  in["fingerprint"] = d.input_fingerprint;
  in["files"] = d.input_files;
  in["documents"] = d.train.documents + d.val.documents;
  in["bytes"] = d.train.bytes + d.val.bytes;
  m["input"] = std::move(in);
  ordered_json splits = ordered_json::object();
  splits["train"] = split_json(d.train, "train.bin");
  splits["val"] = split_json(d.val, "val.bin");
  m["splits"] = std::move(splits);
  io::write_file_atomically(d.manifest_path, {m.dump(2) + "\n"});
}

}  // namespace ultramem::data
