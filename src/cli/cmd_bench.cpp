// `ultramem bench decode`: flags -> perf::run_decode_bench (perf/decode_bench.h); `ultramem bench serve`: flags ->
// perf::run_serve_bench (perf/serve_bench.h); `ultramem bench tiered`: flags -> perf::run_tiered_bench
// (perf/tiered_bench.h).
#include <CLI/CLI.hpp>

#include <memory>

#include "commands.h"
#include "ultramem/perf/decode_bench.h"
#include "ultramem/perf/serve_bench.h"
#include "ultramem/perf/tiered_bench.h"

namespace ultramem::cli {

void add_bench_command(CLI::App& app) {
  auto* bench = app.add_subcommand("bench", "Benchmarks printing JSON lines (see docs/performance.md)");
  bench->require_subcommand(1);
  auto args = std::make_shared<perf::DecodeBenchOptions>();
  auto* cmd = bench->add_subcommand(
      "decode",
      "Single-token decode latency of one layer and of whole models: UltraMem (fp32/bf16/int8 values), the same "
      "in plain libtorch ops, MoE (equal total params and activated FLOPs), dense FFN (equal FLOPs) and PKM, "
      "over batch sizes and value rows N, with the machine's read and gather bandwidth, ratios and targets. "
      "Threads: the global --threads (ultramem --threads 1 bench decode ...)");
  auto& a = *args;
  cmd->add_option("--batches", a.batches, "Batch sizes of the layer sweep (default 1,4,16,64,256,1024)")
      ->delimiter(',');
  cmd->add_option("--sizes", a.log2_sizes, "log2 N of the layer sweep, even (default 16,18,...,--max-log2-n)")
      ->delimiter(',');
  cmd->add_option("--max-log2-n", a.max_log2_n, "Largest log2 N of the default sweeps")
      ->capture_default_str()
      ->check(CLI::Range(4, 40));
  cmd->add_option("--model-sizes", a.model_log2_sizes, "log2 N of the model sweep (default 16,20 up to the max)")
      ->delimiter(',');
  cmd->add_option("--model-batches", a.model_batches, "Batch sizes of the model sweep (default 1,16,64,256)")
      ->delimiter(',');
  cmd->add_option("--values", a.values, "Value table formats: fp32,bf16,int8")->delimiter(',')->capture_default_str();
  cmd->add_option("--keys", a.keys,
                  "Key formats of the fused UltraMem layer and model: fp32,bf16,int8 (compact ones are reported as "
                  "kind ultramem_keys_<format>)")
      ->delimiter(',')
      ->capture_default_str();
  cmd->add_option("--weights", a.weights,
                  "Storage of the models' dense matrices (attention, FFN, experts, LM head): fp32,bf16,int8 (compact "
                  "ones are reported as kind <kind>_weights_<format>; model sweep only)")
      ->delimiter(',')
      ->capture_default_str();
  cmd->add_option("--kinds", a.kinds,
                  "What to time: pooled_lookup,ultramem,ultramem_plain,moe,dense,pkm,ultramem_v2,engram (the last two "
                  "in the model sweep only, at the UltraMem model's FLOPs)")
      ->delimiter(',')
      ->capture_default_str();
  cmd->add_option("--value-prefetch", a.value_prefetch,
                  "Skip-window prefetch compared with none: the UltraMem models (memory placed i:j, i < j) are also "
                  "timed prefetching this many bytes of value rows between retrieval and lookup, in alternation with "
                  "no prefetch (kind ultramem_prefetch, ratio model:prefetch_off_over_on); 0: no comparison")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  cmd->add_flag("--layers-only", a.layers_only, "Only the layer (and pooled lookup) sweep");
  cmd->add_flag("--models-only", a.models_only, "Only the whole-model sweep");
  cmd->add_option("--repeats", a.repeats, "Timed calls per case (median, min, max)")->capture_default_str();
  cmd->add_option("--case-seconds", a.case_seconds, "Stop a case's repeats after this many seconds (at least 3 run)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--min-case-seconds", a.min_case_seconds, "Repeat short cases for at least this long")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--max-mem-gib", a.max_mem_gib, "Skip cases whose estimated memory exceeds this (GiB)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--out", a.out, "Also write the JSON lines to this file");
  cmd->add_option("--plot", a.plot_dir, "Write PNG charts (gnuplot) into this directory");
  cmd->add_flag("--quick", a.quick,
                "Tiny sweep (seconds): layers at N = 2^12, 2^14, a small model at 2^14, batches 1, 4");
  cmd->add_option("--D", a.D, "Model width of every layer")->capture_default_str();
  cmd->add_option("--Dk", a.Dk, "UltraMem key dim")->capture_default_str();
  cmd->add_option("--Dv", a.Dv, "Value dim (UltraMem and PKM)")->capture_default_str();
  cmd->callback([args] { perf::run_decode_bench(*args); });

  auto sargs = std::make_shared<perf::ServeBenchOptions>();
  auto& s = *sargs;
  auto* serve = bench->add_subcommand(
      "serve",
      "Served tokens/s and request latency (p50/p99, time to first token) of `ultramem serve` (in process, "
      "127.0.0.1) at 1..64 concurrent streaming clients, for an UltraMem model (random weights, --config's "
      "shape) and its MoE and dense siblings of equal compute, next to the decode step's tokens/s at the same "
      "batch measured in the same run; ratios and targets as JSON lines. docs/serving.md");
  serve->add_option("--streams", s.streams, "Concurrent clients (each also a decode batch size)")
      ->capture_default_str()
      ->delimiter(',');
  serve->add_option("--kinds", s.kinds, "Models: ultramem, moe, dense")->capture_default_str()->delimiter(',');
  serve->add_option("--config", s.config, "Model shape: backbone and the first UltraMem layer")
      ->capture_default_str()
      ->check(CLI::ExistingFile);
  serve->add_option("--data", s.data_dir, "Prepared data holding the tokenizer (ultramem prepare)")
      ->capture_default_str();
  serve->add_option("--max-tokens", s.max_tokens, "Tokens each request generates (past eos)")->capture_default_str();
  serve->add_option("--requests", s.requests_per_stream, "Requests each client sends one after another")
      ->capture_default_str();
  serve->add_option("--max-batch", s.max_batch, "The server's batch slots")->capture_default_str();
  serve->add_option("--repeats", s.repeats, "Decode-step timing repeats")->capture_default_str();
  serve->add_flag("--stream,!--no-stream", s.stream,
                  "Streamed requests (server-sent events; default) or whole answers (no time to first token)");
  serve->add_flag("--quick", s.quick, "Streams 1 and 4, 8 tokens, one request each (seconds)");
  serve->add_option("--out", s.out, "Also write the JSON lines to this file");
  serve->add_option("--plot", s.plot_dir, "Write serve_tokens_per_second.png (gnuplot) into this directory");
  serve->callback([sargs] { perf::run_serve_bench(*sargs); });

  auto targs = std::make_shared<perf::TieredBenchOptions>();
  auto& t = *targs;
  auto* tiered = bench->add_subcommand(
      "tiered",
      "Decode with a memory of 2^30 virtual slots whose int8 value table (2^28 rows, about 33 GiB) is a file on "
      "disk behind a row cache of --cache-gib, against the same model at 2^24 slots in RAM: step latency, rows "
      "and bytes read, cache hit rate and resident memory at each batch, under Zipfian (warm cache) and uniform "
      "row traffic, with and without the reads issued a block ahead. Writes the table first (about 12 minutes on "
      "2 cores; the free space is checked) and removes it at the end unless --keep. docs/tiered_tables.md");
  tiered->add_option("--log2-slots", t.log2_slots, "Virtual slots E*N of the tiered model, log2 (even)")
      ->capture_default_str();
  tiered->add_option("--ram-log2-slots", t.ram_log2_slots, "Virtual slots of the in-RAM model, log2 (even)")
      ->capture_default_str();
  tiered->add_option("--batches", t.batches, "Batch sizes (sequences decoded per step)")
      ->delimiter(',')
      ->capture_default_str();
  tiered->add_option("--traffic", t.traffic,
                     "Row traffic of the tiered model: zipf (P(rank k) ~ 1/k^s over scattered rows; the cache is "
                     "first filled with the hottest rows), uniform, resident (only rows the warm cache holds: the "
                     "cost without reads)")
      ->delimiter(',')
      ->capture_default_str();
  tiered->add_option("--zipf-s", t.zipf_s, "Zipf exponent s")->capture_default_str();
  tiered->add_option("--cache-gib", t.cache_gib, "The row cache's cap (GiB)")->capture_default_str();
  tiered->add_option("--steps", t.steps, "Timed steps per case of the in-RAM model and of the tiered one with and without reads ahead, taking turns in blocks of 8")
      ->capture_default_str();
  tiered->add_option("--warmup-steps", t.warmup_steps, "Untimed steps before each case")->capture_default_str();
  tiered->add_option("--dir", t.dir,
                     "Where to write the table (ultramem-bench-tiered-<log2>.table; a kept one there is reused)")
      ->capture_default_str();
  tiered->add_option("--table", t.table, "Read this existing table file instead of writing one (never removed)")
      ->check(CLI::ExistingFile);
  tiered->add_flag("--keep", t.keep, "Keep the table written (the next run with the same --dir reuses it)");
  tiered->add_option("--keys", t.keys, "Key format of both models: fp32, bf16, int8")->capture_default_str();
  tiered->add_option("--placement", t.placement, "Memory placement read:write (1-based blocks)")
      ->capture_default_str();
  tiered->add_flag("--quick", t.quick, "2^20 slots on disk, 2^16 in RAM, a 4 MiB cache, batches 1 and 4 (seconds)");
  tiered->add_option("--out", t.out, "Also write the JSON lines to this file");
  tiered->add_option("--plot", t.plot_dir, "Write tiered_latency.png (gnuplot) into this directory");
  tiered->callback([targs] { perf::run_tiered_bench(*targs); });
}

}  // namespace ultramem::cli
