// Shared between the `ultramem bench decode` command (cmd_bench.cpp) and its charts (bench_plot.cpp):
// one measured case of the decode benchmark.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace ultramem::cli {

struct DecodeRecord {
  std::string scope;  // "layer" (one layer), "model" (a whole model), "pool" (the pooled lookup alone)
  std::string kind;   // "ultramem", "ultramem_plain", "moe", "dense", "pkm", "pooled_lookup"
  std::string dtype;  // value table format: "fp32", "bf16", "int8" ("fp32" for layers without one)
  int64_t batch = 0;  // tokens decoded per step (one per sequence)
  int64_t N = 0;      // physical value rows of the comparison point (sets every kind's size)
  double median_s = 0, min_s = 0, max_s = 0;  // latency of one step over the repeats
  double bytes = 0;                           // modelled bytes read per step (spec section 8)
  double bound_s = 0;                         // bandwidth-bound time of those bytes (0: no reference measured)
};

// Writes latency-vs-batch and latency-vs-N charts (PNG, gnuplot's pngcairo terminal) of the records
// into `dir` (created if missing), next to the gnuplot script that drew them (data inline). Returns the
// PNG paths written. Throws std::runtime_error when gnuplot is missing or fails.
std::vector<std::string> plot_decode_records(const std::vector<DecodeRecord>& records, const std::string& dir);

}  // namespace ultramem::cli
