// `ultramem bench decode`: single-token decode latency of one layer and of whole models, UltraMem against
// MoE, dense and PKM, with the machine's bandwidth, ratios and targets (docs/performance.md).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace ultramem::perf {

struct DecodeRecord {
  std::string scope;  // "layer" (one layer), "model" (a whole model), "pool" (the pooled lookup alone)
  std::string kind;   // "ultramem" (fp32 keys), "ultramem_keys_bf16" / "_int8" (compact keys), "ultramem_plain",
                      // "moe", "dense", "pkm", "pooled_lookup"
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

// Options of `ultramem bench decode` (cli/cmd_bench.cpp documents each flag).
struct DecodeBenchOptions {
  std::vector<int64_t> batches;     // empty: default list
  std::vector<int64_t> log2_sizes;  // log2 N of the layer sweep; empty: 16, 18, ..., max_log2_n
  int64_t max_log2_n = 24;
  std::vector<int64_t> model_log2_sizes;  // empty: 16, 20 (those <= max_log2_n)
  std::vector<int64_t> model_batches;     // empty: default list
  std::vector<std::string> values = {"fp32", "bf16", "int8"};
  // Key formats of the fused UltraMem cases (UltraMemImpl::set_key_format); compact ones are timed as
  // kind "ultramem_keys_<format>".
  std::vector<std::string> keys = {"fp32", "int8"};
  // Storage of the models' dense matrices (TransformerImpl::set_weight_format); compact ones are timed
  // as kind "<kind>_weights_<format>" (UltraMem with fp32 keys), in the model sweep only.
  std::vector<std::string> weights = {"fp32", "int8"};
  std::vector<std::string> kinds = {"pooled_lookup", "ultramem", "ultramem_plain", "moe",
                                    "dense",         "pkm",      "ultramem_v2",    "engram"};
  // Skip-window prefetch (TransformerImpl::set_value_prefetch) compared with none: the UltraMem models
  // (fp32 keys and weights) are timed with this many bytes of prefetch and without, in alternation (kind
  // "ultramem_prefetch", ratio model:prefetch_off_over_on). 0: no comparison. The other model cases
  // run with the model's default (off).
  int64_t value_prefetch = int64_t(1) << 20;
  bool layers_only = false, models_only = false, quick = false;
  int repeats = 15;
  double case_seconds = 1.5;      // time budget per case once 3 repeats ran
  double min_case_seconds = 0.1;  // short cases repeat at least this long
  double max_mem_gib = 11.0;      // peak memory budget of one case
  std::string out, plot_dir;
  // The UltraMem layer every other size derives from.
  int64_t D = 256, Dk = 64, Dv = 128, H = 2, m = 32, E = 4;
  // Whole models.
  int64_t vocab = 8192, n_layers = 4, n_heads = 4, ffn_hidden = 688, context = 64;
  std::string placement = "2:3";
};

// Runs the decode benchmark: JSON lines on stdout (and options.out), charts into options.plot_dir.
// std::invalid_argument for bad options.
void run_decode_bench(const DecodeBenchOptions& options);

}  // namespace ultramem::perf
