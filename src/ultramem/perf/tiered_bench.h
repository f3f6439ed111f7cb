// `ultramem bench tiered`: decode with a memory of 2^30 virtual slots whose value table (2^28 int8 rows,
// about 33 GiB) is a file on disk behind a row cache of fixed size, against the same model at 2^24 slots
// with its table in RAM, under uniform and Zipfian row traffic (docs/tiered_tables.md). Prints JSON
// lines (one per case, ratios and `target` lines) and draws a chart.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace ultramem::perf {

struct TieredBenchOptions {
  int64_t log2_slots = 30;      // virtual slots E*N of the tiered model's memory (its table: E*N/E rows)
  int64_t ram_log2_slots = 24;  // the in-RAM model's
  std::vector<int64_t> batches = {1, 16, 64};
  // Row traffic of the tiered model: "zipf" (ranks drawn with P(k) ~ 1/k^s, scattered over the rows by a
  // keyed permutation; the cache is first filled with the hottest rows), "uniform", and "resident" (only
  // rows the warm cache holds: the model's cost without reads, for the profile). The in-RAM model reads the
  // rows its retrieval picks.
  std::vector<std::string> traffic = {"resident", "zipf", "uniform"};
  double zipf_s = 1.0;
  double cache_gib = 4.0;       // the row cache's cap
  int64_t steps = 64;           // timed steps per case of each: in-RAM, tiered with and without reads ahead (blocks of 8)
  int64_t warmup_steps = 16;    // untimed steps before each case
  std::string dir = ".";        // where the table file is written (free space is checked first)
  std::string table;            // an existing table file to read instead (never removed)
  bool keep = false;            // keep the written table (a later run with the same --dir reuses it)
  bool quick = false;           // 2^20 slots, 2^16 in RAM, a 4 MiB cache, batches 1 and 4: seconds
  std::string keys = "int8";    // key format of both models (fp32, bf16, int8)
  std::string out, plot_dir;
  // The model: the decode benchmark's shape.
  int64_t D = 256, Dk = 64, Dv = 128, H = 2, m = 32, E = 4;
  int64_t vocab = 8192, n_layers = 4, n_heads = 4, ffn_hidden = 688, context = 64;
  std::string placement = "2:3";
  uint64_t feistel_key = 0x5eed1e55;
};

// Runs the benchmark: JSON lines on stdout (and options.out), a chart into options.plot_dir.
// std::invalid_argument for bad options, std::runtime_error when the disk lacks the table's space.
void run_tiered_bench(const TieredBenchOptions& options);

}  // namespace ultramem::perf
