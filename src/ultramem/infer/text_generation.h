// `ultramem generate` as a library call: a checkpoint, its run's tokenizer and a text prompt in,
// streamed text out.
#pragma once
#include <iosfwd>
#include <string>

#include <nlohmann/json.hpp>

#include "ultramem/infer/sampling.h"

namespace ultramem::infer {

struct GenerateOptions {
  std::string checkpoint;  // checkpoint file
  std::string data_dir;    // prepared data holding the tokenizer ("" : the run folder's tokenizer, else the run's data)
  std::string prompt;      // text to continue
  // Several prompts instead, one per line of this file ("-": standard input; empty lines skipped),
  // decoded together in batches of `batch` (generate_batch); one JSON line per prompt on text_out.
  std::string prompts_file;
  int64_t batch = 16;
  SamplingOptions sampling;
  bool mmap = false;       // value tables from a read-only mapping of the file
  std::string value_tables;  // a folder of value-table files (export-tables) served behind row caches; "": none
  double value_cache_gib = 4;  // the row caches' cap with value_tables
  std::string keys;  // key storage of the memory layers' fused path: fp32, bf16 or int8; "": the checkpoint's
  std::string weights;  // storage of the dense matrices (set_weight_format): fp32, bf16 or int8; "": the checkpoint's
  // Bytes of value rows each memory placed i:j (i < j) prefetches between its retrieval and its lookup
  // (TransformerImpl::set_value_prefetch); 0: off; -1: the model's default.
  int64_t value_prefetch = -1;
};

// Streams the prompt and its continuation to `text_out` as it is produced; notes and the speed line
// (with the JSON statistics, including stop_reason: eos, max_tokens or context_full) go to `log`.
// Returns the statistics. With prompts_file: for each prompt, in order, a JSON line {"index", "prompt",
// "completion", "tokens", "stop_reason"} on text_out, and the batch statistics on `log`.
nlohmann::json generate_from_checkpoint(const GenerateOptions& options, std::ostream& text_out, std::ostream& log);

}  // namespace ultramem::infer
