// `ultramem quantize` as a library call: a checkpoint whose memory value tables are stored as bf16 or
// int8 (per-row scale), with the validation-loss change it causes.
#pragma once
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

namespace ultramem::infer {

struct QuantizeOptions {
  std::string checkpoint;
  std::string values;
  std::string out;
  std::string data_dir;
  bool no_eval = false;
  int64_t batch_size = 8;
  int64_t seq_len = 0;
  int64_t max_batches = 0;
};

// Loads `checkpoint`, measures the validation loss (unless no_eval or no prepared data is found),
// converts the value tables, measures again, writes `out` (default <stem>.<format>.safetensors next to
// the input). Progress on stderr, the summary on stdout; returns the summary JSON.
// std::invalid_argument for fp32 as target, a model without UltraMem layers, tables already compact.
nlohmann::json quantize_checkpoint(const QuantizeOptions& options);

}  // namespace ultramem::infer
