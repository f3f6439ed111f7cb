// `ultramem bench tiered` (issue 17): a random-init model of the decode benchmark's shape whose one memory
// layer has 2^30 virtual slots, its int8 value table a file on disk behind a row cache capped at 4 GiB,
// against the same model at 2^24 slots with its int8 table in RAM. Per case (traffic, batch): step latency,
// rows and bytes read, the cache's hit rate, resident memory, and how much of the reads' wait the
// read-ahead window (placement i:j) hides. docs/tiered_tables.md describes the pieces and the results.
#include <torch/torch.h>
#include <torch/version.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "ultramem/io/atomic_file.h"
#include "ultramem/io/gnuplot.h"
#include "ultramem/io/process_memory.h"
#include "ultramem/kernels/cpu_features.h"
#include "ultramem/kernels/feistel.h"
#include "ultramem/kernels/isa.h"
#include "ultramem/kernels/value_table_file.h"
#include "ultramem/nn/model_config.h"
#include "ultramem/nn/transformer.h"
#include "ultramem/nn/ultramem.h"
#include "ultramem/ops/tiered_values.h"
#include "ultramem/perf/bench_common.h"
#include "ultramem/perf/tiered_bench.h"
#include "ultramem/perf/timing.h"

namespace ultramem::perf {
namespace {

using json = nlohmann::ordered_json;
constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

double gib(double bytes) { return bytes / kGiB; }

// Synthetic row traffic over `rows` physical rows: uniform, or Zipfian ranks (P(rank k) ~ 1/(k+1)^s, drawn by
// inverting the continuous law: rank = floor(x) - 1 with density ~ x^-s on [1, rows + 1)) placed on the rows
// by a keyed permutation, so that the hot rows lie scattered over the file as a retrieval's would.
class RowTraffic {
 public:
  enum class Kind { kZipf, kUniform, kResident };
  RowTraffic(int64_t rows, double s, uint64_t key) : rows_(rows), s_(s), scatter_(uint64_t(rows), key) {}
  // resident: ranks uniform below `hot` (the rows the cache was warmed with: every row a hit).
  void set_kind(Kind kind, int64_t hot = 1) {
    kind_ = kind;
    hot_ = std::max<int64_t>(1, hot);
  }

  void operator()(int64_t* rows, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
      const uint64_t r = next();
      switch (kind_) {
        case Kind::kZipf: rows[i] = int64_t(scatter_.forward(uint64_t(rank(double(r >> 11) * 0x1p-53)))); break;
        case Kind::kUniform: rows[i] = int64_t(r % uint64_t(rows_)); break;
        case Kind::kResident: rows[i] = int64_t(scatter_.forward(r % uint64_t(hot_))); break;
      }
    }
  }
  // The `count` most probable rows (ranks 0..count-1), in file order.
  std::vector<int64_t> hottest(int64_t count) const {
    std::vector<int64_t> out(size_t(std::min(count, rows_)));
    for (size_t k = 0; k < out.size(); ++k) out[k] = int64_t(scatter_.forward(uint64_t(k)));
    std::sort(out.begin(), out.end());
    return out;
  }
  // The share of draws that fall on ranks below `count` (the best hit rate of a cache of `count` rows).
  double mass_below(int64_t count) const {
    const double n1 = double(rows_) + 1, c1 = double(std::min(count, rows_)) + 1;
    if (s_ == 1.0) return std::log(c1) / std::log(n1);
    const double a = 1.0 - s_;
    return (std::pow(c1, a) - 1.0) / (std::pow(n1, a) - 1.0);
  }

 private:
  int64_t rank(double u) const {
    const double n1 = double(rows_) + 1;
    double x;
    if (s_ == 1.0) {
      x = std::exp(u * std::log(n1));
    } else {
      const double a = 1.0 - s_;
      x = std::pow(1.0 + u * (std::pow(n1, a) - 1.0), 1.0 / a);
    }
    return std::clamp<int64_t>(int64_t(x) - 1, 0, rows_ - 1);
  }
  uint64_t next() {  // splitmix64
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }

  int64_t rows_;
  double s_;
  kernels::FeistelPermutation scatter_;
  Kind kind_ = Kind::kZipf;
  int64_t hot_ = 1;
  uint64_t state_ = 12345;
};

// Per-step samples of one case and mode.
struct Samples {
  std::vector<double> seconds;
  int64_t lookups = 0, misses = 0, reads = 0, bytes_read = 0, hits = 0;
  int64_t storage_bytes = 0;  // /proc/self/io read_bytes
  double wait_seconds = 0, submit_seconds = 0;
  int64_t max_rss = 0;
  void add(const ops::TieredValuesStats& before, const ops::TieredValuesStats& after) {
    lookups += after.lookups - before.lookups;
    hits += after.hits - before.hits;
    misses += after.misses - before.misses;
    reads += after.reads - before.reads;
    bytes_read += after.bytes_read - before.bytes_read;
    wait_seconds += after.wait_seconds - before.wait_seconds;
    submit_seconds += after.submit_seconds - before.submit_seconds;
  }
  double stall() const { return wait_seconds + submit_seconds; }
};

double quantile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[size_t(std::min<double>(double(v.size() - 1), std::floor(q * double(v.size() - 1) + 0.5)))];
}

struct Row {  // for the chart and the ratios
  std::string series;  // "in_ram", "tiered_zipf", "tiered_uniform", "tiered_resident"
  int64_t batch = 0;
  double median_ms = 0, median_ms_ahead_off = 0;
  double ratio = 0;  // tiered: median over the step pairs of tiered / in-RAM
};

class TieredBench {
 public:
  explicit TieredBench(TieredBenchOptions a) : a_(validated(std::move(a))), emit(std::string("bench tiered"), a_.out) {}
  void run();

 private:
  static TieredBenchOptions validated(TieredBenchOptions a);
  nn::ModelConfig model_config(int64_t log2_slots, bool external) const;
  std::string prepare_table(const nn::UltraMemConfig& layer);
  nn::UltraMemImpl& memory_layer(nn::Transformer& model) const;
  // Decode steps of B sequences at position `context`; step(i) takes the i-th slice of random tokens.
  std::function<void(int64_t)> decode_step(nn::Transformer& model, int64_t B) const {
    return make_decode_step(model, a_.vocab, B, a_.context, a_.context + 2);
  }
  nn::Transformer build_in_ram() const;
  void run_models(const std::string& path);
  void ratios_and_targets();
  void plot() const;

  TieredBenchOptions a_;
  JsonLines emit;
  std::vector<Row> rows_;
  bool wrote_table_ = false;
  std::string table_path_;
  double write_peak_rss_gib_ = -1;
  double tiered_peak_rss_gib_ = 0, tiered_allowed_gib_ = 0;
};

TieredBenchOptions TieredBench::validated(TieredBenchOptions a) {
  if (a.quick) {
    a.log2_slots = std::min<int64_t>(a.log2_slots, 20);
    a.ram_log2_slots = std::min<int64_t>(a.ram_log2_slots, 16);
    a.batches = {1, 4};
    a.cache_gib = 4.0 / 1024;
    a.steps = std::min<int64_t>(a.steps, 6);
    a.warmup_steps = std::min<int64_t>(a.warmup_steps, 2);
    a.vocab = 512;
    a.context = 16;
  }
  auto bad = [](const std::string& m) { throw std::invalid_argument("bench tiered: " + m); };
  for (const auto& [name, v] : {std::pair{"--log2-slots", a.log2_slots}, {"--ram-log2-slots", a.ram_log2_slots}}) {
    if (v < 12 || v > 32 || v % 2 != 0)
      bad(std::string(name) + " must be even and in [12, 32] (n = 2^(log2/2) keys per side, at most 65536), got " + std::to_string(v));
  }
  if (a.E != 4) bad("E must be 4");
  if (a.batches.empty()) bad("--batches: give at least one batch size");
  for (int64_t B : a.batches)
    if (B < 1 || B > 1024) bad("--batches: each must be in [1, 1024], got " + std::to_string(B));
  if (a.traffic.empty()) bad("--traffic: give zipf, uniform or both");
  for (const auto& t : a.traffic)
    if (t != "zipf" && t != "uniform" && t != "resident")
      bad("--traffic: expected zipf, uniform or resident, got \"" + t + "\"");
  if (!(a.zipf_s > 0 && a.zipf_s <= 4)) bad("--zipf-s must be in (0, 4], got " + std::to_string(a.zipf_s));
  if (!(a.cache_gib > 0 && a.cache_gib <= 1024)) bad("--cache-gib must be in (0, 1024], got " + std::to_string(a.cache_gib));
  if (a.steps < 1 || a.steps > 100000) bad("--steps must be in [1, 100000], got " + std::to_string(a.steps));
  if (a.warmup_steps < 0 || a.warmup_steps > 100000) bad("--warmup-steps must be in [0, 100000]");
  (void)nn::parse_value_format(a.keys);
  (void)nn::parse_placement(a.placement, a.n_layers);
  return a;
}

nn::ModelConfig TieredBench::model_config(int64_t log2_slots, bool external) const {
  nn::UltraMemConfig c = bench_layer_config(a_.D, int64_t(1) << (log2_slots / 2), a_.E, a_.Dk, a_.Dv, a_.H, a_.m);
  c.external_values = external;
  nn::ModelConfig mc;
  mc.name = external ? "bench-tiered" : "bench-in-ram";
  mc.vocab_size = a_.vocab;
  mc.d_model = a_.D;
  mc.n_layers = a_.n_layers;
  mc.n_heads = a_.n_heads;
  mc.max_seq_len = a_.context + 8;
  mc.ffn_hidden = a_.ffn_hidden;
  mc.ffn = {nn::FfnKind::Dense};
  mc.seed = 3;
  mc.memory_kind = nn::MemoryKind::UltraMem;
  mc.memory_placement = nn::parse_placement(a_.placement, a_.n_layers);
  mc.ultramem = c;
  mc.validate();
  return mc;
}

nn::UltraMemImpl& TieredBench::memory_layer(nn::Transformer& model) const {
  for (const auto& m : model->modules(/*include_self=*/false))
    if (auto* um = m->as<nn::UltraMemImpl>()) return *um;
  throw std::logic_error("bench tiered: the model has no UltraMem layer");
}

// The table file: --table as given, or <dir>/ultramem-bench-tiered-<log2>.table, reused when a kept one of
// the right shape is there, else written (after checking the free space) with progress on stderr.
std::string TieredBench::prepare_table(const nn::UltraMemConfig& layer) {
  const int64_t rows = layer.physical_rows(), dv = layer.Dv;
  auto matches = [&](const std::string& p, std::string* why) {
    const auto info = kernels::read_table_header(p);  // throws naming the file for a damaged one
    if (info.rows == rows && info.dv == dv && info.format == kernels::TableFormat::kInt8) return true;
    if (why)
      *why = "the table " + p + " holds " + std::to_string(info.rows) + " x " + std::to_string(info.dv) + " " +
             kernels::to_string(info.format) + " rows; this run needs " + std::to_string(rows) + " x " +
             std::to_string(dv) + " int8 (--log2-slots " + std::to_string(a_.log2_slots) + ")";
    return false;
  };
  if (!a_.table.empty()) {
    std::string why;
    if (!matches(a_.table, &why)) throw std::invalid_argument("bench tiered: --table: " + why);
    emit({{"table", a_.table}, {"given", true}, {"rows", rows}, {"dv", dv}});
    return a_.table;
  }
  std::filesystem::create_directories(a_.dir);
  const std::string path =
      (std::filesystem::path(a_.dir) / ("ultramem-bench-tiered-" + std::to_string(a_.log2_slots) + ".table")).string();
  for (const auto& stale : io::stale_temporaries(path)) std::filesystem::remove_all(stale);
  std::error_code ec;
  if (std::filesystem::exists(path, ec)) {
    std::string why;
    bool ok = false;
    try {
      ok = matches(path, &why);
    } catch (const std::exception&) {
      ok = false;
    }
    if (ok) {
      emit({{"table", path}, {"reused", true}, {"rows", rows}, {"dv", dv}});
      return path;
    }
    std::filesystem::remove(path);  // our own name: a damaged or other-sized table of an earlier run
  }
  const double bytes = 4096.0 + double(rows) * double(kernels::table_row_bytes(kernels::TableFormat::kInt8, dv));
  const auto space = std::filesystem::space(a_.dir);
  const double margin = kGiB;
  if (bytes + margin > double(space.available)) {
    char msg[512];
    std::snprintf(msg, sizeof msg,
                  "bench tiered: the %lld-row table (2^%lld slots) needs %.1f GiB (plus 1 GiB to spare) in %s, and "
                  "only %.1f GiB are free there; free some space, write it elsewhere (--dir), or use a smaller "
                  "--log2-slots",
                  (long long)rows, (long long)a_.log2_slots, gib(bytes), a_.dir.c_str(), gib(double(space.available)));
    throw std::runtime_error(msg);
  }
  io::reset_resident_high_water();
  const auto t0 = Clock::now();
  auto last = t0;
  const double value_std = layer.value_std;
  ops::write_random_value_table(path, /*int8=*/true, rows, dv, layer.seed, value_std, [&](int64_t done) {
    if (seconds_since(last) < 5 && done < rows) return;
    last = Clock::now();
    const double s = seconds_since(t0), frac = double(done) / double(rows);
    std::fprintf(stderr, "bench tiered: writing %s: %.1f / %.1f GiB, %.0f MB/s, %.0f s left\n", path.c_str(),
                 gib(bytes * frac), gib(bytes), bytes * frac / s / 1e6, frac > 0 ? s / frac - s : 0.0);
  });
  const double s = seconds_since(t0);
  write_peak_rss_gib_ = gib(double(io::resident_high_water_bytes()));
  wrote_table_ = true;
  emit({{"table", path},
        {"written", true},
        {"rows", rows},
        {"dv", dv},
        {"gib", gib(bytes)},
        {"seconds", s},
        {"MB_per_s", bytes / s / 1e6},
        {"peak_rss_gib", write_peak_rss_gib_}});
  return path;
}

nn::Transformer TieredBench::build_in_ram() const {
  nn::Transformer model(model_config(a_.ram_log2_slots, /*external=*/false));
  model->eval();
  auto& layer = memory_layer(model);
  layer.set_value_format(nn::ValueFormat::kInt8);
  layer.set_key_format(nn::parse_value_format(a_.keys));
  return model;
}

void TieredBench::run_models(const std::string& path) {
  io::reset_resident_high_water();
  const double rss_before = gib(double(io::resident_bytes()));
  const auto mc = model_config(a_.log2_slots, /*external=*/true);
  nn::Transformer model(mc);
  model->eval();
  auto& layer = memory_layer(model);
  layer.set_key_format(nn::parse_value_format(a_.keys));
  const auto cache_bytes = int64_t(a_.cache_gib * kGiB);
  auto tiered = std::make_shared<ops::TieredValues>(path, cache_bytes, a_.E, a_.feistel_key);
  layer.set_tiered_values(tiered);
  const int64_t N = tiered->rows();
  auto traffic = std::make_shared<RowTraffic>(N, a_.zipf_s, a_.feistel_key ^ 0xa5a5a5a5ull);
  tiered->set_row_traffic([traffic](int64_t* rows, int64_t n) { (*traffic)(rows, n); });

  double dense_bytes = 0;
  for (const auto& p : model->parameters()) dense_bytes += double(p.numel() * p.element_size());
  for (const auto& b : model->buffers()) dense_bytes += double(b.numel() * b.element_size());
  tiered_allowed_gib_ = a_.cache_gib + gib(dense_bytes) + 1.0;
  emit({{"tiered_model", mc.name},
        {"slots_log2", a_.log2_slots},
        {"N", N},
        {"table", path},
        {"cache_gib", a_.cache_gib},
        {"cache_rows", tiered->cache_rows()},
        {"cache_memory_gib", gib(double(tiered->cache_memory_bytes()))},
        {"dense_gib", gib(dense_bytes)},
        {"io_uring", tiered->uses_io_uring()},
        {"direct_io", tiered->uses_direct_io()},
        {"rss_before_gib", rss_before},
        {"rss_after_build_gib", gib(double(io::resident_bytes()))}});

  const int64_t hot_rows = tiered->cache_rows() * 95 / 100;
  // Sets the traffic; a warm cache for all but uniform: the hottest rows, read in file order, filling 95% of
  // the slots (after the first time mostly hits).
  auto use_traffic = [&](const std::string& kind) {
    traffic->set_kind(kind == "zipf"       ? RowTraffic::Kind::kZipf
                      : kind == "uniform" ? RowTraffic::Kind::kUniform
                                          : RowTraffic::Kind::kResident,
                      hot_rows);
    if (kind == "uniform") return;
    const auto t0 = Clock::now();
    const auto st0 = tiered->stats();
    const int64_t storage0 = io::storage_read_bytes();
    const auto hot = traffic->hottest(hot_rows);
    tiered->warm(hot.data(), int64_t(hot.size()));
    const auto st1 = tiered->stats();
    emit({{"warm", kind},
          {"rows", int64_t(hot.size())},
          {"seconds", seconds_since(t0)},
          {"bytes_read_gib", gib(double(st1.bytes_read - st0.bytes_read))},
          {"storage_read_gib", gib(double(io::storage_read_bytes() - storage0))},
          {"best_hit_rate", traffic->mass_below(int64_t(hot.size()))}});
  };
  // Resident memory of the tiered model alone (the target's): warm cache, then steps of every traffic at
  // the largest batch. The in-RAM model is built after it, for the timed pairs.
  {
    const int64_t B = *std::max_element(a_.batches.begin(), a_.batches.end());
    auto step = decode_step(model, B);
    for (const auto& kind : a_.traffic) {
      use_traffic(kind);
      for (int64_t i = 0; i < 8; ++i) step(i);
    }
    tiered_peak_rss_gib_ = gib(double(io::resident_high_water_bytes()));
    emit({{"tiered_model_peak_rss_gib", tiered_peak_rss_gib_}, {"allowed_gib", tiered_allowed_gib_}});
  }
  nn::Transformer in_ram = build_in_ram();
  std::map<int64_t, std::vector<double>> ram_seconds;  // batch -> every in-RAM step timed
  for (const auto& kind : a_.traffic) {
    use_traffic(kind);
    for (int64_t B : a_.batches) {
      auto step = decode_step(model, B);
      auto ram_step = decode_step(in_ram, B);
      for (int64_t i = 0; i < a_.warmup_steps; ++i) {
        step(i);
        ram_step(i);
      }
      // The in-RAM model and the tiered one with its reads ahead (issued at the retrieval block, waited for
      // at the lookup block) and without (waited for at once) take turns in blocks of a few steps, in the
      // order r a o, then o a r, so that the machine's drift falls on all three while each model runs
      // consecutive steps (its weights and keys warm in the CPU caches, as when it serves alone). The ratio
      // is the median over blocks of their median steps.
      Samples on, off;
      std::vector<double> ram, ratios;
      int64_t t_calls = 0, r_calls = 0;
      auto tiered_block = [&](bool ahead, int64_t n) {
        model->set_tiered_reads_ahead(ahead);
        Samples& s = ahead ? on : off;
        for (int64_t k = 0; k < n; ++k) {
          const auto st0 = tiered->stats();
          const int64_t storage0 = io::storage_read_bytes();
          const auto t0 = Clock::now();
          step(a_.warmup_steps + t_calls++);
          s.seconds.push_back(seconds_since(t0));
          s.add(st0, tiered->stats());
          s.storage_bytes += io::storage_read_bytes() - storage0;
          if (k == 0) s.max_rss = std::max(s.max_rss, io::resident_bytes());
        }
      };
      auto ram_block = [&](int64_t n) {
        for (int64_t k = 0; k < n; ++k) {
          const auto t0 = Clock::now();
          ram_step(a_.warmup_steps + r_calls++);
          ram.push_back(seconds_since(t0));
        }
      };
      auto tail_median = [](const std::vector<double>& v, int64_t n) {
        return quantile(std::vector<double>(v.end() - n, v.end()), 0.5);
      };
      const int64_t block = std::min<int64_t>(8, a_.steps), blocks = std::max<int64_t>(1, a_.steps / block);
      for (int64_t b = 0; b < blocks; ++b) {
        if (b % 2 == 0) {
          ram_block(block);
          tiered_block(true, block);
          tiered_block(false, block);
        } else {
          tiered_block(false, block);
          tiered_block(true, block);
          ram_block(block);
        }
        ratios.push_back(tail_median(on.seconds, block) / tail_median(ram, block));
      }
      model->set_tiered_reads_ahead(true);
      auto& all_ram = ram_seconds[B];
      all_ram.insert(all_ram.end(), ram.begin(), ram.end());
      const double steps = double(on.seconds.size());
      Row r{"tiered_" + kind, B, quantile(on.seconds, 0.5) * 1e3, quantile(off.seconds, 0.5) * 1e3,
            quantile(ratios, 0.5)};
      rows_.push_back(r);
      // The reads' stall: submitting them (the kernel blocks while the device's queue is full) and waiting.
      const double hidden = off.stall() > 0 ? 1.0 - on.stall() / off.stall() : 0.0;
      emit({{"case", "tiered"},
            {"traffic", kind},
            {"slots_log2", a_.log2_slots},
            {"N", N},
            {"batch", B},
            {"steps", int64_t(on.seconds.size())},
            {"median_ms", r.median_ms},
            {"p90_ms", quantile(on.seconds, 0.9) * 1e3},
            {"min_ms", quantile(on.seconds, 0.0) * 1e3},
            {"in_ram_median_ms", quantile(ram, 0.5) * 1e3},
            {"ratio_to_in_ram", r.ratio},
            {"rows_per_step", double(on.lookups) / steps},
            {"rows_read_per_step", double(on.misses) / steps},
            {"reads_per_step", double(on.reads) / steps},
            {"bytes_read_per_step", double(on.bytes_read) / steps},
            {"storage_bytes_per_step", double(on.storage_bytes) / steps},
            {"hit_rate", on.lookups ? double(on.hits) / double(on.lookups) : 0.0},
            {"wait_ms_per_step", on.wait_seconds / steps * 1e3},
            {"submit_ms_per_step", on.submit_seconds / steps * 1e3},
            {"rss_gib", gib(double(std::max(on.max_rss, off.max_rss)))},
            {"reads_ahead_off",
             {{"median_ms", r.median_ms_ahead_off},
              {"wait_ms_per_step", off.wait_seconds / steps * 1e3},
              {"submit_ms_per_step", off.submit_seconds / steps * 1e3},
              {"hit_rate", off.lookups ? double(off.hits) / double(off.lookups) : 0.0}}},
            {"stall_hidden", hidden}});
    }
  }
  for (const auto& [B, secs] : ram_seconds) {
    Row r{"in_ram", B, quantile(secs, 0.5) * 1e3, 0, 1};
    rows_.push_back(r);
    emit({{"case", "in_ram"},
          {"slots_log2", a_.ram_log2_slots},
          {"N", in_ram->config().ultramem.n * in_ram->config().ultramem.n / a_.E},
          {"batch", B},
          {"steps", int64_t(secs.size())},
          {"median_ms", r.median_ms},
          {"p90_ms", quantile(secs, 0.9) * 1e3},
          {"min_ms", quantile(secs, 0.0) * 1e3}});
  }
  const auto st = tiered->stats();
  emit({{"tiered_totals", true},
        {"rows", st.lookups},
        {"rows_read", st.misses},
        {"bytes_read_gib", gib(double(st.bytes_read))},
        {"peak_rss_gib_with_both_models", gib(double(io::resident_high_water_bytes()))}});
}

void TieredBench::ratios_and_targets() {
  auto find = [&](const std::string& series, int64_t B) -> const Row* {
    for (const auto& r : rows_)
      if (r.series == series && r.batch == B) return &r;
    return nullptr;
  };
  // Resident traffic (every row cached): what the larger memory costs without any read, for the profile.
  for (int64_t B : a_.batches) {
    const Row* t = find("tiered_resident", B);
    if (t) emit({{"ratio", "tiered_resident_over_in_ram"}, {"batch", B}, {"value", t->ratio}});
  }
  for (const auto& [kind, bound] : {std::pair{std::string("zipf"), 1.6}, {std::string("uniform"), 3.0}}) {
    if (std::find(a_.traffic.begin(), a_.traffic.end(), kind) == a_.traffic.end()) continue;
    double worst = 0;
    json per_batch = json::object();
    for (int64_t B : a_.batches) {
      const Row* t = find("tiered_" + kind, B);
      if (!t) continue;
      const double ratio = t->ratio;  // median over the timed pairs
      worst = std::max(worst, ratio);
      per_batch[std::to_string(B)] = ratio;
      emit({{"ratio", "tiered_" + kind + "_over_in_ram"},
            {"batch", B},
            {"value", ratio},
            {"reads_ahead_off_over_on", t->median_ms > 0 ? t->median_ms_ahead_off / t->median_ms : 0.0}});
    }
    char what[256];
    std::snprintf(what, sizeof what,
                  "%s traffic%s: the 2^%lld-slot model (table on disk, %.3g GiB cache) within %.1fx of the 2^%lld-slot "
                  "in-RAM model at every batch",
                  kind.c_str(), kind == "zipf" ? ", warm cache" : "", (long long)a_.log2_slots, a_.cache_gib, bound,
                  (long long)a_.ram_log2_slots);
    emit({{"target", what}, {"met", worst > 0 && worst <= bound}, {"worst_ratio", worst}, {"ratios", per_batch},
          {"quick", a_.quick}});
  }
  emit({{"target", "resident memory of the tiered model never above the cache cap + the dense weights + 1 GiB"},
        {"met", tiered_peak_rss_gib_ > 0 && tiered_peak_rss_gib_ <= tiered_allowed_gib_},
        {"peak_rss_gib", tiered_peak_rss_gib_},
        {"allowed_gib", tiered_allowed_gib_},
        {"quick", a_.quick}});
  if (wrote_table_)
    emit({{"target", "peak resident memory while writing the table under 2 GiB"},
          {"met", write_peak_rss_gib_ > 0 && write_peak_rss_gib_ < 2.0},
          {"peak_rss_gib", write_peak_rss_gib_},
          {"quick", a_.quick}});
}

void TieredBench::plot() const {
  std::filesystem::create_directories(a_.plot_dir);
  std::ostringstream gp;
  gp << io::chart_preamble(1100, 620) << "set termoption noenhanced\n"
     << "set output 'tiered_latency.png'\nset logscale x 2\nset logscale y 10\n"
     << "set title 'bench tiered: 2^" << a_.log2_slots << " slots on disk (" << a_.cache_gib << " GiB cache) vs 2^"
     << a_.ram_log2_slots << " in RAM; dashed: reads not ahead'\n"
     << "set xlabel 'batch (sequences decoded per step)'\nset ylabel 'ms per step (median)'\n";
  std::map<std::string, std::vector<const Row*>> by;
  for (const auto& r : rows_) by[r.series].push_back(&r);
  std::ostringstream plots;
  int i = 0;
  for (const auto& [series, rs] : by) {
    gp << "$d" << i << " << EOD\n";
    for (const Row* r : rs) gp << r->batch << " " << r->median_ms << " " << r->median_ms_ahead_off << "\n";
    gp << "EOD\n";
    plots << (i ? ", " : "plot ") << "$d" << i << " using 1:2 with linespoints " << io::series_style(i) << " title '"
          << series << "'";
    if (series != "in_ram")
      plots << ", $d" << i << " using 1:3 with linespoints " << io::series_style(i) << " dashtype 2 title '" << series
            << " (reads not ahead)'";
    ++i;
  }
  gp << plots.str() << "\n";
  io::run_gnuplot(a_.plot_dir, "tiered_latency", gp.str());
}

void TieredBench::run() {
  torch::NoGradGuard no_grad;
  emit({{"context", "ultramem bench tiered"},
        {"threads", at::get_num_threads()},
        {"isa", kernels::active_isa()},
        {"torch", TORCH_VERSION},
        {"cpu", kernels::cpu_model_name()},
        {"mem_available_gib", gib(double(io::available_bytes()))},
        {"quick", a_.quick},
        {"log2_slots", a_.log2_slots},
        {"ram_log2_slots", a_.ram_log2_slots},
        {"batches", a_.batches},
        {"traffic", a_.traffic},
        {"zipf_s", a_.zipf_s},
        {"cache_gib", a_.cache_gib},
        {"keys", a_.keys},
        {"placement", a_.placement},
        {"steps", a_.steps}});
  const auto tiered_cfg = model_config(a_.log2_slots, /*external=*/true);
  (void)model_config(a_.ram_log2_slots, /*external=*/false);
  table_path_ = prepare_table(tiered_cfg.ultramem_layer_config(0));
  // Removes the table this run wrote (unless --keep), also when a case fails.
  struct Cleanup {
    TieredBench* b;
    ~Cleanup() {
      if (!b->wrote_table_ || b->a_.keep) return;
      std::error_code ec;
      std::filesystem::remove(b->table_path_, ec);
    }
  } cleanup{this};
  run_models(table_path_);
  ratios_and_targets();
  if (!a_.plot_dir.empty()) plot();
  if (wrote_table_) emit({{"table", table_path_}, {a_.keep ? "kept" : "removed", true}});
}

}  // namespace

void run_tiered_bench(const TieredBenchOptions& options) {
  TieredBench bench(options);
  bench.run();
}

}  // namespace ultramem::perf
