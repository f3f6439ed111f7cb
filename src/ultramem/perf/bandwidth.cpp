#include "ultramem/perf/bandwidth.h"

#include <omp.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "ultramem/kernels/cpu_features.h"

namespace ultramem::perf {
namespace {

constexpr size_t kAlign = size_t(2) << 20;  // 2 MiB: a huge page
constexpr int64_t kIdPool = int64_t(1) << 20;

volatile uint64_t g_sink = 0;  // keeps the sums alive

bool have_avx2() { return kernels::cpu_has_avx2_fma(); }

// ---- sequential sum -----------------------------------------------------------------------------

uint64_t seq_sum_generic(const unsigned char* p, int64_t bytes) {
  const auto* w = reinterpret_cast<const uint64_t*>(p);
  const int64_t n = bytes / 8;
  uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    a0 += w[i];
    a1 += w[i + 1];
    a2 += w[i + 2];
    a3 += w[i + 3];
  }
  for (; i < n; ++i) a0 += w[i];
  return a0 + a1 + a2 + a3;
}

#if defined(__x86_64__)
__attribute__((target("avx2"))) uint64_t seq_sum_avx2(const unsigned char* p, int64_t bytes) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 128 <= bytes; i += 128) {
    a0 = _mm256_add_epi64(a0, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i)));
    a1 = _mm256_add_epi64(a1, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 32)));
    a2 = _mm256_add_epi64(a2, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 64)));
    a3 = _mm256_add_epi64(a3, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 96)));
  }
  alignas(32) uint64_t l[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(l),
                     _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3)));
  return l[0] + l[1] + l[2] + l[3] + seq_sum_generic(p + i, bytes - i);
}
#endif

uint64_t seq_sum(const unsigned char* p, int64_t bytes) {
#if defined(__x86_64__)
  if (have_avx2()) return seq_sum_avx2(p, bytes);
#endif
  return seq_sum_generic(p, bytes);
}

// ---- random-row gather ----------------------------------------------------------------------------

inline void prefetch_row(const unsigned char* row, int64_t row_bytes) {
  for (int64_t l = 0; l < row_bytes; l += 64) __builtin_prefetch(row + l, 0, 1);
}

uint64_t gather_generic(const unsigned char* base, const int64_t* ids, int64_t cnt, int64_t row_bytes, int pf) {
  uint64_t acc[8] = {};
  for (int64_t i = 0; i < cnt; ++i) {
    if (pf > 0 && i + pf < cnt) prefetch_row(base + ids[i + pf] * row_bytes, row_bytes);
    const auto* w = reinterpret_cast<const uint64_t*>(base + ids[i] * row_bytes);
    for (int64_t j = 0; j < row_bytes / 8; j += 8)
      for (int q = 0; q < 8; ++q) acc[q] += w[j + q];
  }
  uint64_t s = 0;
  for (uint64_t a : acc) s += a;
  return s;
}

#if defined(__x86_64__)
__attribute__((target("avx2"))) uint64_t gather_avx2(const unsigned char* base, const int64_t* ids, int64_t cnt,
                                                     int64_t row_bytes, int pf) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0;
  for (int64_t i = 0; i < cnt; ++i) {
    if (pf > 0 && i + pf < cnt) prefetch_row(base + ids[i + pf] * row_bytes, row_bytes);
    const unsigned char* r = base + ids[i] * row_bytes;
    for (int64_t l = 0; l < row_bytes; l += 64) {
      a0 = _mm256_add_epi32(a0, _mm256_load_si256(reinterpret_cast<const __m256i*>(r + l)));
      a1 = _mm256_add_epi32(a1, _mm256_load_si256(reinterpret_cast<const __m256i*>(r + l + 32)));
    }
  }
  alignas(32) uint32_t l[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(l), _mm256_add_epi32(a0, a1));
  uint64_t s = 0;
  for (uint32_t x : l) s += x;
  return s;
}
#endif

uint64_t gather(const unsigned char* base, const int64_t* ids, int64_t cnt, int64_t row_bytes, int pf) {
  if (pf > 0)
    for (int64_t i = 0; i < std::min<int64_t>(pf, cnt); ++i) prefetch_row(base + ids[i] * row_bytes, row_bytes);
#if defined(__x86_64__)
  if (have_avx2()) return gather_avx2(base, ids, cnt, row_bytes, pf);
#endif
  return gather_generic(base, ids, cnt, row_bytes, pf);
}

// Times `step` until at least min_seconds have passed and 3 iterations ran; returns the sorted
// iteration times in seconds.
template <typename Step>
std::vector<double> run_timed(double min_seconds, Step&& step) {
  using Clock = std::chrono::steady_clock;
  std::vector<double> t;
  const auto start = Clock::now();
  do {
    const auto t0 = Clock::now();
    step();
    t.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
  } while (t.size() < 3 || std::chrono::duration<double>(Clock::now() - start).count() < min_seconds);
  std::sort(t.begin(), t.end());
  return t;
}

BandwidthResult to_result(const std::vector<double>& sorted, int64_t bytes) {
  BandwidthResult r;
  r.iterations = int64_t(sorted.size());
  r.bytes_per_iteration = bytes;
  r.gbps_median = double(bytes) / sorted[sorted.size() / 2] / 1e9;
  r.gbps_best = double(bytes) / sorted.front() / 1e9;
  return r;
}

}  // namespace

ProbeBuffer::ProbeBuffer(size_t bytes, bool huge_pages) : huge_(huge_pages) {
  bytes_ = (std::max<size_t>(bytes, 64) + kAlign - 1) / kAlign * kAlign;
  data_ = static_cast<unsigned char*>(std::aligned_alloc(kAlign, bytes_));
  if (!data_) throw std::runtime_error("ProbeBuffer: cannot allocate " + std::to_string(bytes_) + " bytes");
  madvise(data_, bytes_, huge_pages ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
  auto* w = reinterpret_cast<uint64_t*>(data_);
  const int64_t n = int64_t(bytes_ / 8);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) w[i] = uint64_t(i) * 0x9e3779b97f4a7c15ULL;
}

ProbeBuffer::~ProbeBuffer() { std::free(data_); }

int64_t huge_page_bytes(const void* p, size_t bytes) {
  std::ifstream f("/proc/self/smaps");
  if (!f) return -1;
  const uintptr_t lo = reinterpret_cast<uintptr_t>(p), hi = lo + bytes;
  std::string line;
  bool in = false;
  int64_t total = 0;
  while (std::getline(f, line)) {
    unsigned long a = 0, b = 0;
    char dash = 0;
    if (std::sscanf(line.c_str(), "%lx%c%lx ", &a, &dash, &b) == 3 && dash == '-') {
      in = a < hi && b > lo;
      continue;
    }
    long kb = 0;
    if (in && std::sscanf(line.c_str(), "AnonHugePages: %ld kB", &kb) == 1) total += int64_t(kb) * 1024;
  }
  return total;
}

const char* thp_mode() {
  static const std::string mode = [] {
    std::ifstream f("/sys/kernel/mm/transparent_hugepage/enabled");
    std::string s;
    std::getline(f, s);
    return s;
  }();
  return mode.c_str();
}

BandwidthResult sequential_read(const ProbeBuffer& buf, int threads, double min_seconds, int64_t chunk_bytes) {
  chunk_bytes = std::min<int64_t>(chunk_bytes, int64_t(buf.bytes())) / 64 * 64;
  if (chunk_bytes < 64) throw std::invalid_argument("sequential_read: chunk_bytes must be >= 64");
  threads = std::max(1, threads);
  const int64_t chunks = int64_t(buf.bytes()) / chunk_bytes;
  int64_t next = 0;
  const auto t = run_timed(min_seconds, [&] {
    const unsigned char* p = buf.data() + (next++ % chunks) * chunk_bytes;
    uint64_t total = 0;
    if (threads == 1) {
      total = seq_sum(p, chunk_bytes);
    } else {
#pragma omp parallel num_threads(threads) reduction(+ : total)
      {
        const int64_t nt = omp_get_num_threads(), j = omp_get_thread_num();
        const int64_t per = chunk_bytes / 64 / nt * 64;
        const int64_t b = j * per, e = j == nt - 1 ? chunk_bytes : b + per;
        total += seq_sum(p + b, e - b);
      }
    }
    g_sink = g_sink + total;
  });
  return to_result(t, chunk_bytes);
}

BandwidthResult random_row_gather(const void* table, size_t bytes, const GatherOptions& o) {
  const auto* base = static_cast<const unsigned char*>(table);
  if (reinterpret_cast<uintptr_t>(base) % 64 != 0)
    throw std::invalid_argument("random_row_gather: the table must be 64-byte aligned");
  if (o.rows < 1 || o.row_bytes < 64 || o.row_bytes % 64 != 0)
    throw std::invalid_argument("random_row_gather: rows must be >= 1 and row_bytes a positive multiple of 64");
  if (uint64_t(o.rows) * uint64_t(o.row_bytes) > bytes)
    throw std::invalid_argument("random_row_gather: rows * row_bytes = " + std::to_string(o.rows * o.row_bytes) +
                                " exceeds the table's " + std::to_string(bytes) + " bytes");
  if (o.rows_per_iteration < 1 || o.rows_per_iteration > kIdPool || o.prefetch_rows < 0)
    throw std::invalid_argument("random_row_gather: rows_per_iteration must be in [1, 2^20], prefetch_rows >= 0");
  std::vector<int64_t> ids(kIdPool);
  std::mt19937_64 rng(o.seed ^ uint64_t(o.rows));
  std::uniform_int_distribution<int64_t> pick(0, o.rows - 1);
  for (auto& x : ids) x = pick(rng);
  const int threads = std::max(1, o.threads);
  const int64_t per = o.rows_per_iteration;
  int64_t start = 0;
  const auto t = run_timed(o.min_seconds, [&] {
    const int64_t* r = ids.data() + start;
    uint64_t total = 0;
    if (threads == 1) {
      total = gather(base, r, per, o.row_bytes, o.prefetch_rows);
    } else {
#pragma omp parallel num_threads(threads) reduction(+ : total)
      {
        const int64_t nt = omp_get_num_threads(), j = omp_get_thread_num();
        const int64_t b = per * j / nt, e = per * (j + 1) / nt;
        total += gather(base, r + b, e - b, o.row_bytes, o.prefetch_rows);
      }
    }
    g_sink = g_sink + total;
    start = (start + per) % (kIdPool - per + 1);
  });
  return to_result(t, per * o.row_bytes);
}

}  // namespace ultramem::perf
