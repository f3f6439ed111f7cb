// The run folder that `train` writes and `eval`, `generate`, `quantize` and the experiment harness read:
//   checkpoint.safetensors   weights, optimizer state, model and train config (checkpoint.h)
//   run.json                 the run record: config, data folder, output folder, final results
//   tokenizer.model          the tokenizer the run was trained with (copied in by `train`)
//   metrics.jsonl            progress and evaluation events
// A run folder is self-contained: a checkpoint with its tokenizer beside it needs no data folder.
#pragma once
#include <string>

#include <nlohmann/json.hpp>

namespace ultramem::checkpoint {

inline constexpr const char* kDefaultDataDir = "data/prepared/sotu-v8192";
inline constexpr const char* kRunTokenizerFile = "tokenizer.model";

// The run record: {"data_dir", "config", "out_dir", "model", "train", and after training "final": {...}}.
std::string run_record_path(const std::string& run_dir);
// The run directory of a checkpoint file (its parent directory).
std::string run_dir_of(const std::string& checkpoint_path);
// Data directory for a checkpoint: `explicit_dir` if non-empty, else the run record's (absolute since
// train/run.h writes it so), else the default.
std::string data_dir_for_checkpoint(const std::string& checkpoint_path, const std::string& explicit_dir);
// The tokenizer model stored in the checkpoint's run folder, or "" when the folder has none.
std::string run_tokenizer_path(const std::string& checkpoint_path);

}  // namespace ultramem::checkpoint
