#include "run_files.h"

#include "ultramem/io/atomic_file.h"

#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace ultramem::cli {
namespace fs = std::filesystem;

nlohmann::json read_json_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error(path + ": cannot open");
  std::stringstream ss;
  ss << in.rdbuf();
  try {
    return nlohmann::json::parse(ss.str());
  } catch (const nlohmann::json::parse_error& e) {
    throw std::runtime_error(path + ": invalid JSON: " + e.what());
  }
}

void write_json_file(const std::string& path, const nlohmann::json& j) {
  io::write_file_atomically(path, {j.dump(2) + "\n"});
}

ConfigFile read_config_file(const std::string& path) {
  const auto j = read_json_file(path);
  if (!j.is_object()) throw std::runtime_error(path + ": expected a JSON object");
  ConfigFile c;
  c.train = nlohmann::json::object();
  if (j.contains("model")) {
    for (auto it = j.begin(); it != j.end(); ++it)
      if (it.key() != "model" && it.key() != "train")
        throw std::runtime_error(path + ": unknown top-level key \"" + it.key() +
                                 "\" (a config with \"model\" may only have \"model\" and \"train\")");
    c.model = j.at("model");
    if (j.contains("train")) c.train = j.at("train");
  } else {
    c.model = j;
  }
  return c;
}

std::string run_record_path(const std::string& run_dir) { return (fs::path(run_dir) / "run.json").string(); }

std::string run_dir_of(const std::string& checkpoint_path) {
  const auto parent = fs::path(checkpoint_path).parent_path();
  return parent.empty() ? std::string(".") : parent.string();
}

std::string data_dir_for_checkpoint(const std::string& checkpoint_path, const std::string& explicit_dir) {
  if (!explicit_dir.empty()) return explicit_dir;
  const auto rec = run_record_path(run_dir_of(checkpoint_path));
  if (fs::exists(rec)) {
    const auto j = read_json_file(rec);
    if (j.contains("data_dir") && j["data_dir"].is_string()) return j["data_dir"].get<std::string>();
  }
  return kDefaultDataDir;
}

}  // namespace ultramem::cli
