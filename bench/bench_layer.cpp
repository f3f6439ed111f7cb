// UltraMem benchmarks: the pooled lookup and TDQKR ops and the whole UltraMem layer, forward and
// forward+backward, against the same computation written with plain torch ops (perf/plain_ultramem.h).
// The pooled lookup's value-row bandwidth is compared with the machine's random-row gather bandwidth
// at the same table size, probed by perf/bandwidth.h.
//
//   ultramem_bench [--threads=N] [--sizes=small] [--min-time=S] [--no-verify] [google benchmark flags]
//
// After the benchmarks, one JSON line per ratio of interest is printed (computed from this run):
//   {"ratio":"pool_fwd:op_vs_torch","T":1,"N":65536,...,"value":7.3}
// See docs/performance.md for the recorded figures and how to read them.
#include <ATen/Parallel.h>
#include <torch/torch.h>
#include <torch/version.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "bench_common.h"
#include "ultramem/kernels/isa.h"
#include "ultramem/kernels/pooled_lookup.h"
#include "ultramem/kernels/tdqkr.h"
#include "ultramem/nn/ultramem.h"
#include "ultramem/ops/ops.h"
#include "ultramem/ops/huge_page_tensor.h"
#include "ultramem/ops/runtime.h"
#include "ultramem/perf/bandwidth.h"
#include "ultramem/perf/plain_ultramem.h"

namespace ubench {
namespace {

using torch::Tensor;
using json = nlohmann::ordered_json;

// Fixed model sizes of the task: K = H*m = 2*32 candidates per token, Dv = 256, E = 4, C = 2.
constexpr int64_t kH = 2, kM = 32, kK = kH * kM, kE = 4, kC = 2, kR = 2, kMFirst = 32;
constexpr int64_t kD = 512, kDk = 128;
constexpr int64_t kPoolTokens = 8192;   // distinct tokens of random hits rotated through per table
constexpr int64_t kLayerTokens = 2048;  // distinct input tokens rotated through per layer
constexpr int64_t kStageTokens = 1024;  // tokens with precomputed stage inputs (layer breakdown)

// ---- plain-torch versions (the library's perf/plain_ultramem.h) ----------------------------------

namespace plain = ultramem::perf::plain;

std::pair<Tensor, Tensor> norm_keys(ultramem::nn::UltraMemImpl& L) {
  const auto k = plain::normalise_keys(L);
  return {k.row, k.col};
}

// Layer forward; torch_ops: TDQKR and pooling in plain torch ops, else our ops. kn: normalised keys
// (computed here when undefined, as the module does on every forward).
Tensor layer_forward(ultramem::nn::UltraMemImpl& L, const Tensor& x, bool torch_ops,
                     std::pair<Tensor, Tensor> kn = {}) {
  const auto& c = L.config();
  if (!kn.first.defined()) kn = norm_keys(L);
  const auto [q_row, q_col] = plain::query(L, x);
  const Tensor s_row = plain::side_scores(q_row, kn.first), s_col = plain::side_scores(q_col, kn.second);
  Tensor scores, index;
  if (torch_ops)
    std::tie(scores, index) = plain::tdqkr(s_row, s_col, L.cores, L.u_vec, L.v_vec, c.first_stage_m(), c.m);
  else
    std::tie(scores, index) = ultramem::ops::tdqkr(s_row, s_col, L.cores, L.u_vec, L.v_vec, c.first_stage_m(), c.m);
  const Tensor pooled = torch_ops ? plain::pooled_lookup(L.values, index, scores, L.perm, c.E, c.sparse_value_grad)
                                  : ultramem::ops::pooled_lookup(L.values, index, scores, L.perm, c.E,
                                                                 c.sparse_value_grad);
  return pooled.matmul(L.wo);
}

// ---- data caches (one big table alive at a time) ------------------------------------------------

// Writes a cheap deterministic pattern (values in [-0.05, 0.05)) in parallel: touches every page.
void fill_pattern(float* p, int64_t n) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) p[i] = float((uint64_t(i) * 2654435761ULL >> 12) & 1023) * 1e-4f - 0.05f;
}

struct PoolTable {
  int64_t N = 0;
  bool thp = false;
  Tensor values, perm, index_pool, scores_pool, grad_pool;
};
PoolTable g_pool;

struct LayerCache {
  int64_t n = 0;
  ultramem::nn::UltraMem layer{nullptr};
  Tensor x_pool, g_pool;
  std::pair<Tensor, Tensor> kn;  // normalised keys (for the cached-keys variant)
  Tensor k2_row, k2_col;         // kn as contiguous [H*r*n, Dk] matrices (stage "score_gemm")
  bool stages = false;           // stage inputs below computed
  Tensor q_row, q_col, s_row, s_col, scores, index, pooled;  // [kStageTokens, ...]
};
LayerCache g_layer;

void release_all_but(const char* keep) {
  if (std::strcmp(keep, "pool") != 0) g_pool = PoolTable{};
  if (std::strcmp(keep, "layer") != 0) g_layer = LayerCache{};
}

PoolTable& pool_table(int64_t N, bool thp) {
  if (g_pool.N == N && g_pool.thp == thp) return g_pool;
  release_all_but("none");
  torch::NoGradGuard ng;
  PoolTable t;
  t.N = N;
  t.thp = thp;
  t.values = thp ? ultramem::ops::detail::empty_on_huge_pages({N, kDv}, torch::kFloat) : torch::empty({N, kDv});
  fill_pattern(t.values.data_ptr<float>(), N * kDv);
  const int64_t huge = ultramem::perf::huge_page_bytes(t.values.data_ptr(), size_t(N) * kDv * sizeof(float));
  std::fprintf(stderr, "[bench] value table N=%lld (%s): %.1f MiB, THP-backed %.1f MiB\n",
               (long long)N, thp ? "THP alloc, THP permutation" : "torch alloc", N * kDv * 4 / 1048576.0,
               huge / 1048576.0);
  t.values.requires_grad_(true);
  auto gen = at::detail::createCPUGenerator(1234 + N);
  t.perm = torch::randperm(kE * N, gen, torch::kLong);
  if (thp) {  // the permutation is read at random too (one int64 per hit): same pages as the values
    t.perm = ultramem::ops::detail::copy_to_huge_pages(t.perm);
  }
  t.index_pool = torch::randint(0, kE * N, {kPoolTokens, kK}, gen, torch::kLong);
  t.scores_pool = torch::randn({kPoolTokens, kK, kC}, gen);
  t.grad_pool = torch::randn({kPoolTokens, kE * kDv}, gen);
  g_pool = std::move(t);
  return g_pool;
}

LayerCache& layer_cache(int64_t n) {
  if (g_layer.n == n) return g_layer;
  release_all_but("none");
  ultramem::nn::UltraMemConfig c;
  c.D = kD;
  c.n = n;
  c.E = kE;
  c.Dk = kDk;
  c.Dv = kDv;
  c.r = kR;
  c.C = kC;
  c.H = kH;
  c.m = kM;
  c.m_first = kMFirst;
  c.value_init = ultramem::nn::ValueInit::Fixed;
  c.track_stats = false;
  c.sparse_value_grad = true;  // forward+backward: row-sparse value gradient (dense would be N x Dv)
  c.seed = 7;
  g_layer.n = n;
  g_layer.layer = ultramem::nn::UltraMem(c);
  const auto& v = g_layer.layer->values;
  const int64_t huge = ultramem::perf::huge_page_bytes(v.data_ptr(), size_t(v.numel()) * sizeof(float));
  std::fprintf(stderr, "[bench] layer n=%lld N=%lld: values %.1f MiB, THP-backed %.1f MiB\n",
               (long long)n, (long long)c.physical_rows(), v.numel() * 4 / 1048576.0, huge / 1048576.0);
  auto gen = at::detail::createCPUGenerator(99);
  g_layer.x_pool = torch::randn({kLayerTokens, kD}, gen);
  g_layer.g_pool = torch::randn({kLayerTokens, kD}, gen);
  torch::NoGradGuard ng;
  g_layer.kn = norm_keys(*g_layer.layer);
  return g_layer;
}

void zero_grads(torch::nn::Module& m) {
  for (auto& p : m.parameters()) p.mutable_grad().reset();
}

// ---- benchmarks -------------------------------------------------------------------------------

enum class Impl { Op, Kernel, Torch, OpCachedKeys };
const char* impl_name(Impl i) {
  switch (i) {
    case Impl::Op: return "op";
    case Impl::Kernel: return "kernel";
    case Impl::Torch: return "torch";
    case Impl::OpCachedKeys: return "op_cachedkeys";
  }
  return "?";
}

double bm_pool_fwd(benchmark::State& st, Impl impl, int64_t T, int64_t N, bool thp) {
  PoolTable& P = pool_table(N, thp);
  torch::NoGradGuard ng;
  Tensor out = torch::empty({T, kE * kDv});
  ultramem::kernels::PoolShape s{T, kK, N, kDv, kE, kC};
  const float* values = P.values.data_ptr<float>();
  const int64_t* perm = P.perm.data_ptr<int64_t>();
  int64_t it = 0;
  return timed_loop(st, [&] {
    const int64_t start = (it++ * T) % kPoolTokens;
    const Tensor idx = P.index_pool.narrow(0, start, T), sc = P.scores_pool.narrow(0, start, T);
    switch (impl) {
      case Impl::Op: {
        const Tensor o = ultramem::ops::pooled_lookup(P.values, idx, sc, P.perm, kE);
        benchmark::DoNotOptimize(o.data_ptr());
        break;
      }
      case Impl::Kernel:
        ultramem::kernels::pooled_lookup_forward<float>(s, values, idx.data_ptr<int64_t>(), sc.data_ptr<float>(),
                                                        perm, out.data_ptr<float>());
        benchmark::ClobberMemory();
        break;
      default: {  // Impl::Torch
        const Tensor o = plain::pooled_lookup(P.values, idx, sc, P.perm, kE, false);
        benchmark::DoNotOptimize(o.data_ptr());
        break;
      }
    }
  });
}

double bm_pool_fwdbwd(benchmark::State& st, Impl impl, int64_t T, int64_t N, bool sparse) {
  PoolTable& P = pool_table(N, false);
  int64_t it = 0;
  return timed_loop(st, [&] {
    const int64_t start = (it++ * T) % kPoolTokens;
    const Tensor idx = P.index_pool.narrow(0, start, T);
    const Tensor sc = P.scores_pool.narrow(0, start, T).detach().requires_grad_(true);
    const Tensor g = P.grad_pool.narrow(0, start, T);
    const Tensor o = impl == Impl::Torch ? plain::pooled_lookup(P.values, idx, sc, P.perm, kE, sparse)
                                         : ultramem::ops::pooled_lookup(P.values, idx, sc, P.perm, kE, sparse);
    o.backward(g);
    benchmark::DoNotOptimize(P.values.grad().unsafeGetTensorImpl());
    benchmark::DoNotOptimize(sc.grad().data_ptr());
    P.values.mutable_grad().reset();
  });
}

struct TdqkrData {
  Tensor s_row, s_col, cores, u, v, g;
};
TdqkrData& tdqkr_data(int64_t n, int64_t T) {
  static std::map<std::pair<int64_t, int64_t>, TdqkrData> cache;
  auto& d = cache[{n, T}];
  if (!d.s_row.defined()) {
    auto gen = at::detail::createCPUGenerator(n * 1000 + T);
    d.s_row = torch::randn({T, kH, kR, n}, gen).requires_grad_(true);
    d.s_col = torch::randn({T, kH, kR, n}, gen).requires_grad_(true);
    d.cores = torch::rand({kC, kH, kR, kR}, gen).requires_grad_(true);
    torch::NoGradGuard ng;
    auto [U, S, Vh] = torch::linalg_svd(d.cores.sum(0), false);
    d.u = U.select(2, 0).contiguous();
    d.v = Vh.select(1, 0).contiguous();
    d.g = torch::randn({T, kH * kM, kC}, gen);
  }
  return d;
}

double bm_tdqkr(benchmark::State& st, Impl impl, int64_t n, int64_t T, bool backward) {
  TdqkrData& d = tdqkr_data(n, T);
  std::optional<torch::NoGradGuard> ng;
  if (!backward) ng.emplace();
  Tensor sc_out = torch::empty({T, kH * kM, kC});
  Tensor idx_out = torch::empty({T, kH * kM}, torch::kLong);
  ultramem::kernels::TdqkrShape s{T, kH, kR, n, kC, kMFirst, kM};
  return timed_loop(st, [&] {
    if (impl == Impl::Kernel) {
      ultramem::kernels::tdqkr_forward<float>(s, d.s_row.data_ptr<float>(), d.s_col.data_ptr<float>(),
                                              d.cores.data_ptr<float>(), d.u.data_ptr<float>(),
                                              d.v.data_ptr<float>(), sc_out.data_ptr<float>(),
                                              idx_out.data_ptr<int64_t>());
      benchmark::ClobberMemory();
      return;
    }
    auto [scores, index] = impl == Impl::Torch ? plain::tdqkr(d.s_row, d.s_col, d.cores, d.u, d.v, kMFirst, kM)
                                               : ultramem::ops::tdqkr(d.s_row, d.s_col, d.cores, d.u, d.v, kMFirst, kM);
    if (backward) {
      scores.backward(d.g);
      benchmark::DoNotOptimize(d.s_row.grad().data_ptr());
      d.s_row.mutable_grad().reset();
      d.s_col.mutable_grad().reset();
      d.cores.mutable_grad().reset();
    }
    benchmark::DoNotOptimize(index.data_ptr());
  });
}

double bm_layer(benchmark::State& st, Impl impl, int64_t n, int64_t T, bool backward) {
  LayerCache& Lc = layer_cache(n);
  auto& L = *Lc.layer;
  std::optional<torch::NoGradGuard> ng;
  if (!backward) ng.emplace();
  int64_t it = 0;
  return timed_loop(st, [&] {
    const int64_t start = (it++ * T) % kLayerTokens;
    const Tensor x = Lc.x_pool.narrow(0, start, T);
    Tensor out;
    switch (impl) {
      case Impl::Op: out = Lc.layer->forward(x); break;
      case Impl::OpCachedKeys: out = layer_forward(L, x, false, Lc.kn); break;
      default: out = layer_forward(L, x, true); break;
    }
    if (backward) {
      out.backward(Lc.g_pool.narrow(0, start, T));
      zero_grads(L);
    }
    benchmark::DoNotOptimize(out.data_ptr());
  });
}

// One stage of the layer forward (inference, no grad), inputs precomputed for kStageTokens tokens.
double bm_layer_stage(benchmark::State& st, const std::string& stage, int64_t n, int64_t T) {
  LayerCache& Lc = layer_cache(n);
  auto& L = *Lc.layer;
  const auto& c = L.config();
  torch::NoGradGuard ng;
  if (!Lc.stages) {
    const Tensor x = Lc.x_pool.narrow(0, 0, kStageTokens);
    std::tie(Lc.q_row, Lc.q_col) = plain::query(L, x);
    Lc.s_row = plain::side_scores(Lc.q_row, Lc.kn.first);
    Lc.s_col = plain::side_scores(Lc.q_col, Lc.kn.second);
    std::tie(Lc.scores, Lc.index) = ultramem::ops::tdqkr(Lc.s_row, Lc.s_col, L.cores, L.u_vec, L.v_vec,
                                                         c.first_stage_m(), c.m);
    Lc.pooled = ultramem::ops::pooled_lookup(L.values, Lc.index, Lc.scores, L.perm, c.E);
    Lc.k2_row = Lc.kn.first.permute({0, 2, 1, 3}).reshape({c.H * c.r * c.n, c.Dk}).contiguous();
    Lc.k2_col = Lc.kn.second.permute({0, 2, 1, 3}).reshape({c.H * c.r * c.n, c.Dk}).contiguous();
    Lc.stages = true;
  }
  int64_t it = 0;
  return timed_loop(st, [&] {
    const int64_t start = (it++ * T) % kStageTokens;
    Tensor out;
    if (stage == "qproj") {
      out = std::get<0>(plain::query(L, Lc.x_pool.narrow(0, start, T)));
    } else if (stage == "keynorm") {
      out = norm_keys(L).first;
    } else if (stage == "score") {
      out = plain::side_scores(Lc.q_row.narrow(0, start, T), Lc.kn.first);
      out = plain::side_scores(Lc.q_col.narrow(0, start, T), Lc.kn.second);
    } else if (stage == "score_gemm") {
      out = Lc.q_row.narrow(0, start, T).matmul(Lc.k2_row.t());
      out = Lc.q_col.narrow(0, start, T).matmul(Lc.k2_col.t());
    } else if (stage == "tdqkr") {
      out = std::get<0>(ultramem::ops::tdqkr(Lc.s_row.narrow(0, start, T), Lc.s_col.narrow(0, start, T), L.cores,
                                             L.u_vec, L.v_vec, c.first_stage_m(), c.m));
    } else if (stage == "pool") {
      out = ultramem::ops::pooled_lookup(L.values, Lc.index.narrow(0, start, T), Lc.scores.narrow(0, start, T),
                                         L.perm, c.E);
    } else if (stage == "wo") {
      out = Lc.pooled.narrow(0, start, T).matmul(L.wo);
    }
    benchmark::DoNotOptimize(out.data_ptr());
  });
}

// ---- correctness of the comparisons (small sizes, before timing) --------------------------------

json verify() {
  torch::NoGradGuard ng;
  json j;
  j["check"] = "plain-torch versions compute the same as ours";
  {  // pooled lookup
    const int64_t N = 4096, T = 16;
    auto gen = at::detail::createCPUGenerator(5);
    const Tensor values = torch::randn({N, kDv}, gen), perm = torch::randperm(kE * N, gen, torch::kLong);
    const Tensor index = torch::randint(0, kE * N, {T, kK}, gen, torch::kLong);
    const Tensor scores = torch::randn({T, kK, kC}, gen);
    const Tensor ours = ultramem::ops::pooled_lookup(values, index, scores, perm, kE);
    const Tensor reference = plain::pooled_lookup(values, index, scores, perm, kE, false);
    j["pool_torch_maxdiff"] = (ours - reference).abs().max().item<double>();
  }
  {  // tdqkr
    TdqkrData& d = tdqkr_data(256, 8);
    auto [s1, i1] = ultramem::ops::tdqkr(d.s_row, d.s_col, d.cores, d.u, d.v, kMFirst, kM);
    auto [s2, i2] = plain::tdqkr(d.s_row, d.s_col, d.cores, d.u, d.v, kMFirst, kM);
    j["tdqkr_index_equal"] = torch::equal(i1, i2);
    j["tdqkr_scores_maxdiff"] = (s1 - s2).abs().max().item<double>();
  }
  {  // layer
    LayerCache& Lc = layer_cache(128);
    const Tensor x = Lc.x_pool.narrow(0, 0, 32);
    const Tensor a = Lc.layer->forward(x), b = layer_forward(*Lc.layer, x, true),
                 c = layer_forward(*Lc.layer, x, false, Lc.kn);
    j["layer_torch_maxdiff"] = (a - b).abs().max().item<double>();
    j["layer_cachedkeys_maxdiff"] = (a - c).abs().max().item<double>();
    g_layer = LayerCache{};
  }
  return j;
}

// ---- result collection and the summary -------------------------------------------------------------

struct Result {
  double sec = 0;  // real seconds per iteration (best of repetitions)
  Meta meta;
};
std::map<std::string, Result> g_results;

int64_t param(const Meta& m, const char* k, int64_t dflt = -1) {
  auto it = m.params.find(k);
  return it == m.params.end() ? dflt : it->second;
}
double gbps(const Result& r) { return r.meta.value_bytes / r.sec / 1e9; }

// Random-row gather bandwidth (GB/s) of a table of N rows of kDv floats with all threads, on 4 KiB
// pages (thp 0) or huge pages (thp 1), best of plain and prefetching loads; thp -1: the best of both.
// Probed once per (N, thp) with perf/bandwidth.h, on a buffer of the table's size.
double gather_ref(int64_t N, int thp) {
  if (thp < 0) return std::max(gather_ref(N, 0), gather_ref(N, 1));
  static std::map<std::pair<int64_t, int>, double> probed;
  const auto key = std::make_pair(N, thp);
  if (auto it = probed.find(key); it != probed.end()) return it->second;
  const int64_t row_bytes = kDv * int64_t(sizeof(float));
  ultramem::perf::ProbeBuffer buf(size_t(N) * row_bytes, thp == 1);
  double best = 0;
  for (int pf : {0, 4}) {
    ultramem::perf::GatherOptions o;
    o.rows = N;
    o.row_bytes = row_bytes;
    o.prefetch_rows = pf;
    o.threads = threads();
    o.min_seconds = min_time();
    best = std::max(best, ultramem::perf::random_row_gather(buf, o).gbps_median);
  }
  std::cout << json{{"bandwidth", "random_row_gather"}, {"N", N}, {"thp", thp}, {"threads", threads()},
                    {"gbps", best}}.dump() << std::endl;
  return probed[key] = best;
}

class Collector : public benchmark::ConsoleReporter {
 public:
  Collector() : ConsoleReporter(OO_None) {}
  void ReportRuns(const std::vector<Run>& runs) override {
    std::vector<Run> out = runs;
    for (auto& run : out) {
      if (run.run_type != Run::RT_Iteration || run.error_occurred || run.iterations == 0) continue;
      auto it = registry().find(run.run_name.function_name);
      if (it == registry().end()) continue;
      auto med = run.counters.find("med_us");
      const double sec = med != run.counters.end() ? med->second.value * 1e-6
                                                   : run.real_accumulated_time / double(run.iterations);
      Result& r = g_results[it->first];
      if (r.sec == 0 || sec < r.sec) r = Result{sec, it->second};
      if (it->second.family == "pool_fwd") {
        const double ref = gather_ref(param(it->second, "N"), -1);
        if (ref > 0) run.counters["eff"] = benchmark::Counter(it->second.value_bytes / sec / 1e9 / ref);
      }
    }
    ConsoleReporter::ReportRuns(out);
  }
};

void add_params(json& j, const Meta& m) {
  for (const auto& [k, v] : m.params) j[k] = v;
}

void print_summary(std::ostream& os) {
  // Ratios ours / torch (speed-ups), same family and parameters.
  std::map<std::string, std::vector<double>> targets;  // family:impl -> ratios at T <= 64
  for (const auto& [tn, t] : g_results) {
    if (t.meta.impl != "torch") continue;
    for (const auto& [on, o] : g_results) {
      if (o.meta.family != t.meta.family || o.meta.params != t.meta.params || o.meta.impl == "torch") continue;
      json j;
      j["ratio"] = t.meta.family + ":" + o.meta.impl + "_vs_torch";
      add_params(j, o.meta);
      j["value"] = t.sec / o.sec;
      j["ours_us"] = o.sec * 1e6;
      j["torch_us"] = t.sec * 1e6;
      os << j.dump() << "\n";
      if (param(o.meta, "T") <= 64 && param(o.meta, "thp", 0) == 0 && param(o.meta, "sparse", 1) == 1)
        targets[t.meta.family + ":" + o.meta.impl].push_back(t.sec / o.sec);
    }
  }
  // Value-row read efficiency of the pooled forward vs the machine's random-gather bandwidth.
  for (const auto& [name, r] : g_results) {
    if (r.meta.family != "pool_fwd") continue;
    const int64_t N = param(r.meta, "N");
    json j;
    j["ratio"] = "pool_fwd:" + r.meta.impl + "_gather_efficiency";
    add_params(j, r.meta);
    const double ref = gather_ref(N, -1), ref4k = gather_ref(N, 0);
    j["value"] = ref > 0 ? gbps(r) / ref : 0.0;
    j["gbps"] = gbps(r);
    j["ref_gbps"] = ref;
    j["ref_4k_gbps"] = ref4k;
    j["eff_vs_4k"] = ref4k > 0 ? gbps(r) / ref4k : 0.0;
    os << j.dump() << "\n";
    if (r.meta.impl == "torch" && ref > 0) {
      // The best any implementation can do is to read the value rows at the measured random-gather
      // bandwidth; the torch version's time over that is the largest speed-up possible.
      json b;
      b["ratio"] = "pool_fwd:bound_vs_torch";
      add_params(b, r.meta);
      b["value"] = r.sec / (r.meta.value_bytes / (ref * 1e9));
      os << b.dump() << "\n";
    }
  }
  for (const auto& [what, v] : targets) {
    json j;
    j["target"] = what + "_vs_torch >= 5 at T in 1..64";
    j["min"] = *std::min_element(v.begin(), v.end());
    j["max"] = *std::max_element(v.begin(), v.end());
    j["points"] = v.size();
    j["met"] = *std::min_element(v.begin(), v.end()) >= 5.0;
    os << j.dump() << "\n";
  }
}

std::string read_first_line(const char* path) {
  std::ifstream f(path);
  std::string s;
  std::getline(f, s);
  return s;
}

json context(bool quick) {
  json j;
  j["context"] = "ultramem_bench";
  j["threads"] = threads();
  j["torch_threads"] = at::get_num_threads();
  j["isa"] = ultramem::kernels::active_isa();
  j["torch"] = TORCH_VERSION;
  j["thp"] = read_first_line("/sys/kernel/mm/transparent_hugepage/enabled");
  j["sizes"] = quick ? "small" : "full";
  double load[3] = {0, 0, 0};
  if (getloadavg(load, 3) == 3) j["loadavg"] = {load[0], load[1], load[2]};
  return j;
}

// ---- registration -----------------------------------------------------------------------------------

void register_all(bool quick) {
  const std::vector<int64_t> Ns = quick ? std::vector<int64_t>{1 << 16, 1 << 18}
                                        : std::vector<int64_t>{1 << 16, 1 << 18, 1 << 20, 1 << 22};

  const double row_bytes = double(kDv) * sizeof(float);
  for (int64_t N : Ns) {
    // Forward on a torch-allocated table (what the library sees), every T.
    for (int64_t T : {1, 8, 64, 512})
      for (Impl impl : {Impl::Op, Impl::Kernel, Impl::Torch}) {
        Meta m{"pool_fwd", impl_name(impl), {{"T", T}, {"N", N}, {"thp", 0}}, double(T * kK) * row_bytes, double(T)};
        add(m, [=](benchmark::State& st) { return bm_pool_fwd(st, impl, T, N, false); });
      }
    // Forward + backward, row-sparse value gradient (dense only at small N: it is an N x Dv buffer).
    for (int sparse : {1, 0})
      for (int64_t T : {1, 64, 512}) {
        if (!sparse && (N > (1 << 18) || T == 64)) continue;
        for (Impl impl : {Impl::Op, Impl::Torch}) {
          Meta m{"pool_fwdbwd", impl_name(impl), {{"T", T}, {"N", N}, {"sparse", sparse}}, double(T * kK) * row_bytes,
                 double(T)};
          add(m, [=](benchmark::State& st) { return bm_pool_fwdbwd(st, impl, T, N, sparse); });
        }
      }
    // Forward on a THP-backed table.
    for (int64_t T : {64, 512})
      for (Impl impl : {Impl::Op, Impl::Kernel, Impl::Torch}) {
        Meta m{"pool_fwd", impl_name(impl), {{"T", T}, {"N", N}, {"thp", 1}}, double(T * kK) * row_bytes, double(T)};
        add(m, [=](benchmark::State& st) { return bm_pool_fwd(st, impl, T, N, true); });
      }
  }

  for (int64_t n : quick ? std::vector<int64_t>{256} : std::vector<int64_t>{256, 1024, 2048})
    for (int64_t T : {1, 64, 512}) {
      for (Impl impl : {Impl::Op, Impl::Kernel, Impl::Torch}) {
        Meta m{"tdqkr_fwd", impl_name(impl), {{"n", n}, {"T", T}}, 0, double(T)};
        add(m, [=](benchmark::State& st) { return bm_tdqkr(st, impl, n, T, false); });
      }
      for (Impl impl : {Impl::Op, Impl::Torch}) {
        Meta m{"tdqkr_fwdbwd", impl_name(impl), {{"n", n}, {"T", T}}, 0, double(T)};
        add(m, [=](benchmark::State& st) { return bm_tdqkr(st, impl, n, T, true); });
      }
    }

  const std::vector<int64_t> ns = quick ? std::vector<int64_t>{512} : std::vector<int64_t>{512, 1024, 2048, 4096};
  for (int64_t n : ns) {
    const int64_t N = n * n / kE;
    for (int64_t T : {1, 64, 512}) {
      for (Impl impl : {Impl::Op, Impl::OpCachedKeys, Impl::Torch}) {
        Meta m{"layer_fwd", impl_name(impl), {{"n", n}, {"N", N}, {"T", T}}, double(T * kK) * row_bytes, double(T)};
        add(m, [=](benchmark::State& st) { return bm_layer(st, impl, n, T, false); });
      }
      for (Impl impl : {Impl::Op, Impl::Torch}) {
        Meta m{"layer_fwdbwd", impl_name(impl), {{"n", n}, {"N", N}, {"T", T}}, double(T * kK) * row_bytes,
               double(T)};
        add(m, [=](benchmark::State& st) { return bm_layer(st, impl, n, T, true); });
      }
    }
    if (n == ns.back())
      for (int64_t T : {1, 64})
        for (const char* stage : {"qproj", "keynorm", "score", "score_gemm", "tdqkr", "pool", "wo"}) {
          const std::string sname = stage;
          Meta m{"layer_stage", sname, {{"n", n}, {"N", N}, {"T", T}}, 0, double(T)};
          add(m, [=](benchmark::State& st) { return bm_layer_stage(st, sname, n, T); });
        }
  }
}

}  // namespace
}  // namespace ubench

int main(int argc, char** argv) {
  int nthreads = 0;
  bool quick = false, do_verify = true;
  std::vector<char*> rest;
  for (int i = 0; i < argc; ++i) {
    const std::string a = argv[i];
    if (a.rfind("--threads=", 0) == 0) {
      nthreads = std::atoi(a.c_str() + 10);
    } else if (a.rfind("--min-time=", 0) == 0) {
      ubench::min_time() = std::atof(a.c_str() + 11);
    } else if (a == "--sizes=small") {
      quick = true;
    } else if (a == "--no-verify") {
      do_verify = false;
    } else {
      rest.push_back(argv[i]);
    }
  }
  int rargc = static_cast<int>(rest.size());
  rest.push_back(nullptr);
  ultramem::set_threads(nthreads);
  ubench::threads() = nthreads > 0 ? nthreads : ultramem::default_threads();
  benchmark::Initialize(&rargc, rest.data());
  if (benchmark::ReportUnrecognizedArguments(rargc, rest.data())) return 1;

  std::cout << ubench::context(quick).dump() << std::endl;
  if (do_verify) std::cout << ubench::verify().dump() << std::endl;
  ubench::register_all(quick);
  ubench::Collector reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  std::cout << "---- summary (JSON lines) ----\n";
  ubench::print_summary(std::cout);
  double load[3] = {0, 0, 0};
  if (getloadavg(load, 3) == 3)
    std::cout << nlohmann::ordered_json{{"loadavg_end", {load[0], load[1], load[2]}}}.dump() << "\n";
  benchmark::Shutdown();
  return 0;
}
