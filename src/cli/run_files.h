// Files the subcommands share: config files (a model config, or {"model": ..., "train": ...}) and the
// run record (run.json) that `train` leaves in its output directory for `eval` and `generate`.
#pragma once
#include <string>

#include <nlohmann/json.hpp>

namespace ultramem::cli {

inline constexpr const char* kDefaultDataDir = "data/prepared/sotu-v8192";

struct ConfigFile {
  nlohmann::json model;  // ModelConfig JSON
  nlohmann::json train;  // TrainConfig JSON overrides (an empty object when absent)
};

// Reads a JSON config: either a model config, or an object with "model" and optional "train".
// std::runtime_error naming the file for unreadable / invalid JSON.
ConfigFile read_config_file(const std::string& path);

nlohmann::json read_json_file(const std::string& path);
void write_json_file(const std::string& path, const nlohmann::json& j);  // atomic

// The run record: {"data_dir", "config", "out_dir", and after training "final": {...}}.
std::string run_record_path(const std::string& run_dir);
// The run directory of a checkpoint file (its parent directory).
std::string run_dir_of(const std::string& checkpoint_path);
// Data directory for a checkpoint: `explicit_dir` if non-empty, else the run record's, else the default.
std::string data_dir_for_checkpoint(const std::string& checkpoint_path, const std::string& explicit_dir);

}  // namespace ultramem::cli
