// `ultramem export --format hf`: a checkpoint as a portable model folder (docs/python.md, "Exported model
// folders"): config.json, model.safetensors with one tensor per matrix in [out, in] layout and descriptive
// names, the sentencepiece tokenizer and generation defaults. The Python package's
// TransformerLM.from_pretrained(DIR) loads it. A sharded checkpoint is consolidated on the way.
#pragma once
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/types.h>

#include "ultramem/checkpoint/checkpoint.h"

namespace ultramem::infer {

inline constexpr const char* kHfExportFormat = "ultramem-hf";
inline constexpr int kHfExportVersion = 1;

struct HfExportOptions {
  std::string checkpoint;  // checkpoint file (one file or the main file of a sharded run)
  std::string out_dir;     // the model folder (created; files in it are replaced)
  std::string tokenizer;   // tokenizer.model to copy; "": the run folder's, else the run's prepared data's
  std::string data_dir;    // prepared data holding the tokenizer ("": the run's), when the run folder has none
};

// The checkpoint's model tensors ([in, out] matrices, fused gate|up and q|k|v, project names) as the
// export's [out, in] matrices under descriptive names, in model order. std::invalid_argument naming the
// tensor when the checkpoint lacks one its config implies.
std::vector<std::pair<std::string, torch::Tensor>> hf_tensors(const checkpoint::Checkpoint& ckpt);

// Writes the folder; returns a summary {"out_dir", "tensors", "bytes", "value_format", "tokenizer",
// "shards_consolidated"}. Progress notes go to `log`. std::runtime_error naming the file on I/O failure.
nlohmann::json export_hf(const HfExportOptions& options, std::ostream& log);

}  // namespace ultramem::infer
