// `ultramem quantize` as a library call: a checkpoint whose memory value tables are stored as bf16 or
// int8 (per-row scale), and/or whose inference path uses compact keys (recorded in its metadata), with
// the validation-loss change it causes.
#pragma once
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

namespace ultramem::infer {

struct QuantizeOptions {
  std::string checkpoint;
  std::string values;  // "bf16" | "int8" | "" (keep the tables as they are)
  std::string keys;    // "bf16" | "int8" | "fp32" | "" (keep the recorded key format)
  std::string weights;  // "bf16" | "int8" | "" (keep): the dense matrices' storage (set_weight_format)
  std::string out;
  std::string data_dir;
  bool no_eval = false;
  int64_t batch_size = 8;
  int64_t seq_len = 0;
  int64_t max_batches = 0;
};

// Loads `checkpoint`, measures the validation loss (unless no_eval or no prepared data is found),
// converts the value tables and/or sets the key format, measures again (with compact keys also the
// share of kept candidates the fp32 keys keep too), writes `out` (default <stem>.<formats>.safetensors
// next to the input). Progress on stderr, the summary on stdout; returns the summary JSON.
// std::invalid_argument for none of values, keys and weights given, fp32 as value or weight target,
// values or keys for a model without UltraMem layers, tables already compact.
nlohmann::json quantize_checkpoint(const QuantizeOptions& options);

}  // namespace ultramem::infer
