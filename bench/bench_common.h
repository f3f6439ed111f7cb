// Shared between the two benchmark translation units: the torch-free raw-bandwidth benchmarks
// (bench_gather.cpp) and the libtorch benchmarks plus main (bench_layer.cpp).
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
constexpr int64_t kMaxRows = int64_t(1) << 22;   // largest table: 2^22 rows = 4 GiB

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

// ---- torch-free helpers (bench_gather.cpp) -------------------------------------------------------

bool cpu_has_avx2();
// Registers the sequential-read and random-row gather benchmarks for the given table sizes.
void register_raw_benchmarks(const std::vector<int64_t>& Ns);
// Top-k selection of the TDQKR kernel (kernels/topk.h select_top, its comparator passed as a
// function pointer) against an inlined comparator and a one-pass scan (the proposed fixes).
void register_topk_benchmarks();
bool topk_variants_agree();  // the three give the same ids in the same order
// Frees the raw benchmark buffers (2 x 4 GiB) so that later benchmarks have the memory.
void release_raw_buffers();
// Bytes of [p, p+bytes) backed by transparent huge pages, from /proc/self/smaps (-1 if unknown).
int64_t thp_bytes(const void* p, size_t bytes);
// Allocates `bytes` aligned to 2 MiB; with huge = true, madvise(MADV_HUGEPAGE), else
// madvise(MADV_NOHUGEPAGE). Pages are not touched. Free with std::free.
void* alloc_table(size_t bytes, bool huge);
// Writes a cheap deterministic pattern (values in [-0.05, 0.05)) in parallel: touches every page.
void fill_pattern(float* p, int64_t n);

// A bench-local pooled-lookup forward (float, AVX2) showing the fix proposed in docs/performance.md:
// resolve perm[index] for all hits first (independent loads), then one gather stream with
// software prefetch `pf_rows` rows ahead that does not restart at token boundaries; and, when there
// are fewer tokens than threads, split each token's hits over the threads (partial sums, reduced).
// Same contract and, for T >= threads, bit-identical results to kernels::pooled_lookup_forward.
struct PoolArgs {
  int64_t T, K, N, Dv, E, C;
  const float* values;
  const int64_t* index;
  const float* scores;
  const int64_t* perm;
  float* out;
};
void pool_forward_proposed(const PoolArgs& a, int pf_rows, int threads);

}  // namespace ubench
