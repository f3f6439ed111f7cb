#include "ultramem/checkpoint/run_folder.h"

#include <filesystem>

#include "ultramem/io/json_file.h"

namespace ultramem::checkpoint {
namespace fs = std::filesystem;

std::string run_record_path(const std::string& run_dir) { return (fs::path(run_dir) / "run.json").string(); }

std::string run_dir_of(const std::string& checkpoint_path) {
  const auto parent = fs::path(checkpoint_path).parent_path();
  return parent.empty() ? std::string(".") : parent.string();
}

std::string data_dir_for_checkpoint(const std::string& checkpoint_path, const std::string& explicit_dir) {
  if (!explicit_dir.empty()) return explicit_dir;
  const auto rec = run_record_path(run_dir_of(checkpoint_path));
  if (fs::exists(rec)) {
    const auto j = io::read_json_file(rec);
    if (j.contains("data_dir") && j["data_dir"].is_string()) return j["data_dir"].get<std::string>();
  }
  return kDefaultDataDir;
}

std::string run_tokenizer_path(const std::string& checkpoint_path) {
  const auto p = fs::path(run_dir_of(checkpoint_path)) / kRunTokenizerFile;
  return fs::exists(p) ? p.string() : std::string();
}

}  // namespace ultramem::checkpoint
