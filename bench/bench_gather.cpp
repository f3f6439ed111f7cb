// Torch-free raw memory benchmarks: sequential read bandwidth and random 1 KiB-row gather bandwidth
// of this machine, for value-table sizes N = 2^16..2^22 rows, with and without transparent huge
// pages and software prefetch. Also a bench-local pooled-lookup forward that demonstrates the
// kernel fix proposed in docs/performance.md. Hot loops use AVX2 via target attributes, so this TU
// is compiled without -mavx2; main() only registers these benchmarks when the CPU has AVX2.
#include <immintrin.h>
#include <omp.h>
#include <sys/mman.h>

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "bench_common.h"
#include "ultramem/kernels/cpu_features.h"
#include "ultramem/kernels/topk.h"
#include "ultramem/perf/bandwidth.h"

namespace ubench {
namespace {

constexpr size_t kHuge = size_t(2) << 20;
constexpr int64_t kRowPool = int64_t(1) << 20;      // random row ids per N (rotated through)
// Iterations are kept short (about 1 ms) so that the median iteration time is one that no other
// process on a shared machine interrupted (the scheduler tick here is 4 ms).
constexpr int64_t kRowsPerIter = int64_t(1) << 13;  // 8 Ki rows = 8 MiB read per iteration
constexpr int64_t kSeqBytes = int64_t(1) << 25;     // sequential read: 32 MiB per iteration, walking
                                                    // through the whole 4 GiB buffer

volatile float g_sink = 0;

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};
using Buf = std::unique_ptr<float, FreeDeleter>;

Buf g_buf[2];  // [0]: 4 KiB pages (MADV_NOHUGEPAGE), [1]: THP (MADV_HUGEPAGE); kMaxRows x kDv each
std::map<int64_t, std::vector<int64_t>> g_rows;  // random row ids per N

const float* buffer(bool huge) {
  Buf& b = g_buf[huge ? 1 : 0];
  if (!b) {
    const size_t bytes = size_t(kMaxRows) * kDv * sizeof(float);
    b.reset(static_cast<float*>(alloc_table(bytes, huge)));
    if (!b) {
      std::fprintf(stderr, "bench: cannot allocate %zu bytes\n", bytes);
      std::abort();
    }
    fill_pattern(b.get(), kMaxRows * kDv);
    const int64_t thp = thp_bytes(b.get(), bytes);
    std::fprintf(stderr, "[bench] raw table (%s): %.2f GiB, THP-backed %.2f GiB\n",
                 huge ? "MADV_HUGEPAGE" : "MADV_NOHUGEPAGE", bytes / 1073741824.0,
                 thp < 0 ? -1.0 : thp / 1073741824.0);
  }
  return b.get();
}

const std::vector<int64_t>& rows_for(int64_t N) {
  auto& v = g_rows[N];
  if (v.empty()) {
    std::mt19937_64 rng(0x5eed0000ULL + N);
    std::uniform_int_distribution<int64_t> pick(0, N - 1);
    v.resize(kRowPool);
    for (auto& x : v) x = pick(rng);
  }
  return v;
}

// Sum of w * row over the rows (the value-read part of the pooled lookup, one accumulator row in
// L1). pf > 0: software prefetch of the row pf rows ahead, with locality LOC (the kernel uses 1).
template <int LOC>
__attribute__((target("avx2,fma"))) float gather_range(const float* table, const int64_t* rows,
                                                       int64_t cnt, int pf) {
  alignas(32) float acc[kDv];
  for (int64_t d = 0; d < kDv; ++d) acc[d] = 0.f;
  const __m256 w = _mm256_set1_ps(0.5f);
  auto prefetch = [&](int64_t i) {
    const char* q = reinterpret_cast<const char*>(table + rows[i] * kDv);
    for (int64_t l = 0; l < kDv * int64_t(sizeof(float)); l += 64) __builtin_prefetch(q + l, 0, LOC);
  };
  if (pf > 0)
    for (int64_t i = 0; i < std::min<int64_t>(pf, cnt); ++i) prefetch(i);
  for (int64_t i = 0; i < cnt; ++i) {
    if (pf > 0 && i + pf < cnt) prefetch(i + pf);
    const float* r = table + rows[i] * kDv;
    for (int64_t d = 0; d < kDv; d += 8)
      _mm256_store_ps(acc + d, _mm256_fmadd_ps(w, _mm256_loadu_ps(r + d), _mm256_load_ps(acc + d)));
  }
  __m256 s = _mm256_setzero_ps();
  for (int64_t d = 0; d < kDv; d += 8) s = _mm256_add_ps(s, _mm256_load_ps(acc + d));
  alignas(32) float l[8];
  _mm256_store_ps(l, s);
  return l[0] + l[1] + l[2] + l[3] + l[4] + l[5] + l[6] + l[7];
}

__attribute__((target("avx2"))) float seq_sum(const float* p, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 = _mm256_add_ps(a0, _mm256_load_ps(p + i));
    a1 = _mm256_add_ps(a1, _mm256_load_ps(p + i + 8));
    a2 = _mm256_add_ps(a2, _mm256_load_ps(p + i + 16));
    a3 = _mm256_add_ps(a3, _mm256_load_ps(p + i + 24));
  }
  alignas(32) float l[8];
  _mm256_store_ps(l, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  float s = l[0] + l[1] + l[2] + l[3] + l[4] + l[5] + l[6] + l[7];
  for (; i < n; ++i) s += p[i];
  return s;
}

double bm_seqread(benchmark::State& st, int thr) {
  const float* base = buffer(true);
  const int64_t n = kSeqBytes / int64_t(sizeof(float)), chunks = kMaxRows * kDv / n;
  int64_t chunk = 0;
  return timed_loop(st, [&] {
    const float* p = base + (chunk++ % chunks) * n;
    float total = 0;
#pragma omp parallel num_threads(thr) reduction(+ : total)
    {
      const int nt = omp_get_num_threads(), j = omp_get_thread_num();
      const int64_t per = (n / nt) & ~int64_t(31);
      const int64_t b = j * per, e = j == nt - 1 ? n : b + per;
      total += seq_sum(p + b, e - b);
    }
    g_sink = g_sink + total;
  });
}

double bm_gather(benchmark::State& st, int64_t N, bool huge, int pf, int loc, int thr) {
  const float* table = buffer(huge);
  const std::vector<int64_t>& rows = rows_for(N);
  int64_t start = 0;
  return timed_loop(st, [&] {
    float total = 0;
    const int64_t* r = rows.data() + start;
#pragma omp parallel num_threads(thr) reduction(+ : total)
    {
      const int nt = omp_get_num_threads(), j = omp_get_thread_num();
      const int64_t b = kRowsPerIter * j / nt, e = kRowsPerIter * (j + 1) / nt;
      total += loc == 3 ? gather_range<3>(table, r + b, e - b, pf) : gather_range<1>(table, r + b, e - b, pf);
    }
    g_sink = g_sink + total;
    start = (start + kRowsPerIter) % kRowPool;
  });
}

// ---- proposed pooled-lookup forward -----------------------------------------------------------

// y[0:n] += a * x[0:n], multiply then add (no FMA), as the kernels (built with -ffp-contract=off).
__attribute__((target("avx2"))) inline void axpy(float* __restrict y, float a, const float* __restrict x,
                                                 int64_t n) {
  const __m256 va = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_loadu_ps(y + i), _mm256_mul_ps(va, _mm256_loadu_ps(x + i))));
  for (; i < n; ++i) y[i] += a * x[i];
}

struct Hit {
  int64_t row;   // physical value row
  int64_t dst;   // offset of the destination slice (token t, group p) in the output buffer
  int64_t w;     // offset of the hit's scores
};

// Accumulates the hits into their destinations; value rows prefetched pf rows ahead over the
// whole list (no restart at token boundaries).
__attribute__((target("avx2"))) void run_hits(const PoolArgs& a, const Hit* hits, int64_t cnt, int pf,
                                              float* out) {
  const int64_t Dv = a.Dv, Ds = a.Dv / a.C, row_bytes = a.Dv * int64_t(sizeof(float));
  auto prefetch = [&](int64_t i) {
    const char* q = reinterpret_cast<const char*>(a.values + hits[i].row * Dv);
    for (int64_t l = 0; l < row_bytes; l += 64) __builtin_prefetch(q + l, 0, 1);
  };
  for (int64_t i = 0; i < std::min<int64_t>(pf, cnt); ++i) prefetch(i);
  for (int64_t i = 0; i < cnt; ++i) {
    if (i + pf < cnt) prefetch(i + pf);
    const float* val = a.values + hits[i].row * Dv;
    const float* w = a.scores + hits[i].w;
    float* dst = out + hits[i].dst;
    for (int64_t c = 0; c < a.C; ++c) axpy(dst + c * Ds, w[c], val + c * Ds, Ds);
  }
}

}  // namespace

bool cpu_has_avx2() { return ultramem::kernels::cpu_has_avx2_fma(); }

void* alloc_table(size_t bytes, bool huge) {
  const size_t sz = (bytes + kHuge - 1) / kHuge * kHuge;
  void* p = std::aligned_alloc(kHuge, sz);
  if (p) madvise(p, sz, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
  return p;
}

void fill_pattern(float* p, int64_t n) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i)
    p[i] = float((uint64_t(i) * 2654435761ULL >> 12) & 1023) * 1e-4f - 0.05f;
}

int64_t thp_bytes(const void* p, size_t bytes) { return ultramem::perf::huge_page_bytes(p, bytes); }

void release_raw_buffers() {
  g_buf[0].reset();
  g_buf[1].reset();
  g_rows.clear();
}

void pool_forward_proposed(const PoolArgs& a, int pf_rows, int thr) {
  const int64_t T = a.T, K = a.K, width = a.E * a.Dv;
  if (T == 0) return;
  thr = std::max(1, thr);
  static std::vector<float> partial;  // [thr, T, width] when T < thr
  const bool split_k = T < thr;
  if (split_k) partial.assign(size_t(thr) * T * width, 0.f);
#pragma omp parallel num_threads(thr)
  {
    const int nt = omp_get_num_threads(), j = omp_get_thread_num();
    thread_local std::vector<Hit> hits;
    hits.clear();
    float* out = a.out;
    if (!split_k) {
      const int64_t t0 = T * j / nt, t1 = T * (j + 1) / nt;
      std::memset(a.out + t0 * width, 0, sizeof(float) * (t1 - t0) * width);
      for (int64_t h = t0 * K; h < t1 * K; ++h) {  // stage 1: independent perm loads
        const int64_t v = a.perm[a.index[h]], p = v / a.N;
        hits.push_back({v - p * a.N, (h / K) * width + p * a.Dv, h * a.C});
      }
    } else {
      out = partial.data() + size_t(j) * T * width;
      const int64_t k0 = K * j / nt, k1 = K * (j + 1) / nt;
      for (int64_t t = 0; t < T; ++t)
        for (int64_t k = k0; k < k1; ++k) {
          const int64_t h = t * K + k, v = a.perm[a.index[h]], p = v / a.N;
          hits.push_back({v - p * a.N, t * width + p * a.Dv, h * a.C});
        }
    }
    run_hits(a, hits.data(), int64_t(hits.size()), pf_rows, out);  // stage 2: one prefetched stream
    if (split_k) {
#pragma omp barrier
      const int64_t total = T * width, b = total * j / nt, e = total * (j + 1) / nt;
      for (int64_t i = b; i < e; ++i) {
        float s = 0.f;
        for (int q = 0; q < nt; ++q) s += partial[size_t(q) * total + i];
        a.out[i] = s;
      }
    }
  }
}

// ---- top-k selection, as used by the TDQKR kernel (kernels/topk.h) ------------------------------

namespace {
using ultramem::kernels::Ranked;
namespace kernels = ultramem::kernels;

// The proposed replacement: select_top with the same comparator passed as a lambda (inlined)
// instead of a function pointer. Same result and order.
void select_top_lambda(std::vector<Ranked<float>>& c, int64_t k) {
  auto before = [](const Ranked<float>& a, const Ranked<float>& b) { return kernels::ranks_before(a, b); };
  if (k < int64_t(c.size())) std::nth_element(c.begin(), c.begin() + k, c.end(), before);
  std::sort(c.begin(), c.begin() + std::min<int64_t>(k, c.size()), before);
}

// One pass keeping the k best in a sorted buffer: most candidates cost one compare with the
// current k-th best. Works on the raw scores, without building the candidate array first.
void top_k_scan(const float* score, int64_t n, int64_t k, std::vector<Ranked<float>>& best) {
  auto before = [](const Ranked<float>& a, const Ranked<float>& b) { return kernels::ranks_before(a, b); };
  best.clear();
  float thr = 0.f;        // score of the current k-th best once the buffer is full
  bool plain = false;     // full and thr is not NaN: the float test below is exact
  for (int64_t i = 0; i < n; ++i) {
    const float v = score[i];
    if (plain && !(v >= thr)) continue;  // worse than the k-th best (or NaN): cannot enter
    const Ranked<float> x{v, i, i};
    const bool full = int64_t(best.size()) == k;
    if (full && !before(x, best.back())) continue;
    if (full) best.pop_back();
    best.insert(std::upper_bound(best.begin(), best.end(), x, before), x);
    if (int64_t(best.size()) == k) {
      thr = best.back().score;
      plain = !std::isnan(thr);
    }
  }
}

double bm_topk(benchmark::State& st, int impl, int64_t n, int64_t k) {
  std::mt19937 rng(42 + n);
  std::normal_distribution<float> nd;
  std::vector<float> score(n);
  for (auto& x : score) x = nd(rng);
  std::vector<Ranked<float>> c, best;
  c.reserve(n);
  best.reserve(k + 1);
  return timed_loop(st, [&] {
    if (impl == 2) {
      top_k_scan(score.data(), n, k, best);
      benchmark::DoNotOptimize(best.data());
      return;
    }
    c.resize(n);
    for (int64_t i = 0; i < n; ++i) c[i] = {score[i], i, i};
    if (impl == 0)
      kernels::select_top(c, k);
    else
      select_top_lambda(c, k);
    benchmark::DoNotOptimize(c.data());
  });
}
}  // namespace

bool topk_variants_agree() {
  std::mt19937 rng(7);
  std::normal_distribution<float> nd;
  for (int64_t n : {256, 1024, 2048}) {
    std::vector<float> score(n);
    for (auto& x : score) x = std::round(nd(rng) * 8) / 8;  // many ties
    std::vector<Ranked<float>> a(n), b, s;
    for (int64_t i = 0; i < n; ++i) a[i] = {score[i], i, i};
    b = a;
    kernels::select_top(a, 32);
    select_top_lambda(b, 32);
    top_k_scan(score.data(), n, 32, s);
    for (int64_t x = 0; x < 32; ++x)
      if (a[x].id != b[x].id || a[x].id != s[x].id) return false;
  }
  return true;
}

void register_topk_benchmarks() {
  const char* names[] = {"select_top", "lambda", "scan"};
  for (int64_t n : {256, 1024, 2048})
    for (int impl : {0, 1, 2}) {
      Meta m{"topk", names[impl], {{"n", n}, {"k", 32}}, 0, 0};
      add(m, [=](benchmark::State& st) { return bm_topk(st, impl, n, 32); });
    }
}

void register_raw_benchmarks(const std::vector<int64_t>& Ns) {
  const int thr = threads();
  const double iter_bytes = double(kRowsPerIter) * kDv * sizeof(float);
  std::vector<int> thr_list = {thr};
  if (thr != 1) thr_list.push_back(1);
  for (int t : thr_list) {
    Meta m{"seqread", "thp", {{"thr", t}}, double(kSeqBytes), 0};
    add(m, [t](benchmark::State& st) { return bm_seqread(st, t); });
  }
  auto gather = [&](int64_t N, bool huge, int pf, int loc, int t) {
    std::string impl = pf == 0 ? "plain" : (loc == 3 ? "pf_t0" : "pf");
    Meta m{"gather", impl, {{"N", N}, {"thp", huge ? 1 : 0}, {"pf", pf}, {"thr", t}}, iter_bytes, 0};
    add(m, [=](benchmark::State& st) { return bm_gather(st, N, huge, pf, loc, t); });
  };
  // THP runs first (one 4 GiB buffer), then 4 KiB pages (the second buffer).
  for (int huge : {1, 0})
    for (int64_t N : Ns)
      for (int pf : {0, 4}) gather(N, huge, pf, 1, thr);
  const int64_t big = Ns.back();
  for (int pf : {1, 2, 8, 16}) gather(big, true, pf, 1, thr);  // prefetch distance sweep
  gather(big, true, 4, 3, thr);                                 // prefetcht0 instead of prefetcht2
  if (thr != 1)
    for (int huge : {1, 0})
      for (int pf : {0, 4}) gather(big, huge, pf, 1, 1);  // one core (what a T=1 call can use)
}

}  // namespace ubench
