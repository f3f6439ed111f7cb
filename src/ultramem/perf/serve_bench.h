// `ultramem bench serve`: the HTTP server (serve::Server, in process on 127.0.0.1) under 1..64
// concurrent streaming clients, for an UltraMem model and its MoE and dense siblings of equal compute
// (perf/decode_sizing.h), next to the decode step's tokens/s at the same batch sizes measured in the
// same run. Prints JSON lines (one per case, ratios and `target` lines) and draws a chart.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace ultramem::perf {

struct ServeBenchOptions {
  std::vector<int64_t> streams = {1, 4, 16, 64};  // concurrent clients; each sends its requests in turn
  std::vector<std::string> kinds = {"ultramem", "moe", "dense"};
  // The model shape: backbone (vocab is replaced by the tokenizer's) and the first memory layer with its
  // placement; MoE and dense siblings derived from it (derive_model_sizes). Random weights.
  std::string config = "configs/ultramem-small.json";
  std::string data_dir = "data/prepared/sotu-v8192";  // prepared data holding the tokenizer
  int64_t max_tokens = 64;           // tokens per request (ignore_eos: every request generates them all)
  int64_t requests_per_stream = 3;   // requests each client sends one after another
  int64_t max_batch = 64;            // the server's batch slots
  int repeats = 15;                  // decode-step timing repeats (perf::time_calls)
  double case_seconds = 1.0;         // decode-step timing budget per case
  bool stream = true;                // streamed requests (server-sent events, a write per token); false:
                                     // whole answers (no time to first token)
  bool quick = false;                // streams 1 and 4, 8 tokens, one request each: seconds
  std::string out;                   // also write the JSON lines here
  std::string plot_dir;              // write serve_tokens_per_second.png (+ .gp) here
};

void run_serve_bench(const ServeBenchOptions& options);

}  // namespace ultramem::perf
