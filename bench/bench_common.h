// The Google Benchmark plumbing of ultramem_bench (bench_layer.cpp): names, registration, robust timing.
#pragma once
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

namespace ubench {

constexpr int64_t kDv = 256;                     // value width used throughout (1 KiB float rows)

// What a benchmark measures, for the summary computed after the run.
struct Meta {
  std::string family;                      // e.g. "pool_fwd", "gather"
  std::string impl;                        // e.g. "op", "kernel", "torch", "thp_pf4"
  std::map<std::string, int64_t> params;   // e.g. T, N, n, thr (ordered -> stable names)
  double value_bytes = 0;                  // value-row bytes read per iteration (0: not applicable)
  double tokens = 0;                       // tokens per iteration (0: not applicable)
};

// Registered benchmarks by name (name = family/impl/k:v/...).
inline std::map<std::string, Meta>& registry() {
  static std::map<std::string, Meta> r;
  return r;
}

inline std::string make_name(const Meta& m) {
  std::string s = m.family + "/" + m.impl;
  for (const auto& [k, v] : m.params) s += "/" + k + ":" + std::to_string(v);
  return s;
}

// Minimum measuring time per benchmark point, seconds (main's --min-time=S; default 0.2).
inline double& min_time() {
  static double t = 0.2;
  return t;
}

// Thread count of this run (set by main before registration).
inline int& threads() {
  static int t = 1;
  return t;
}

// Runs the benchmark loop, timing every iteration; returns the median iteration time in seconds.
// The median (not Google Benchmark's mean) is what the summary uses: it is robust to the
// occasional preemption on a shared machine (a descheduled OpenMP worker costs a whole timeslice).
template <typename Step>
double timed_loop(benchmark::State& st, Step&& step) {
  std::vector<double> t;
  t.reserve(4096);
  step();  // warm-up, untimed: first touch, one-time caches (a slow first call would be the only sample)
  for (auto _ : st) {
    const auto t0 = std::chrono::steady_clock::now();
    step();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  if (t.empty()) return 0;
  std::nth_element(t.begin(), t.begin() + t.size() / 2, t.end());
  return t[t.size() / 2];
}

// Registers fn (which returns timed_loop's median) under the name derived from m, with the run
// settings common to every benchmark (real time, since most of them are multi-threaded) and the
// counters: med_us (median iteration), tok/s and GB/s (value-row bytes) from the median.
inline benchmark::internal::Benchmark* add(const Meta& m, std::function<double(benchmark::State&)> fn) {
  const std::string name = make_name(m);
  registry()[name] = m;
  const double tokens = m.tokens, bytes = m.value_bytes;
  auto* b = benchmark::RegisterBenchmark(name.c_str(), [fn, tokens, bytes](benchmark::State& st) {
    const double med = fn(st);
    if (med <= 0) return;
    st.counters["med_us"] = benchmark::Counter(med * 1e6);
    if (tokens > 0) st.counters["tok/s"] = benchmark::Counter(tokens / med);
    if (bytes > 0) st.counters["GB/s"] = benchmark::Counter(bytes / med / 1e9);
  });
  b->MinTime(min_time())->UseRealTime()->Unit(benchmark::kMicrosecond);
  return b;
}

}  // namespace ubench
