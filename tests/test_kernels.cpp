// Torch-free tests of the TDQKR and pooled-lookup kernels (spec sections 4 and 5).
//
//   * kernels vs their scalar references (bit-identical where the association order is the same),
//   * kernels vs independent formulas written here from the spec / header contracts,
//   * TDQKR exactness and recall against the brute-force grid search,
//   * backward passes vs references and vs finite differences,
//   * determinism across OpenMP thread counts and agreement of the generic and AVX2 builds,
//   * shape validation messages.
//
// Every check asserts; nothing is only printed. All randomness is seeded (std::mt19937).
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <iomanip>
#include <iterator>
#include <limits>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "ultramem/kernels/cpu_features.h"
#include "ultramem/kernels/feistel.h"
#include "ultramem/kernels/isa.h"
#include "ultramem/kernels/kernel_table.h"
#include "ultramem/kernels/pooled_lookup.h"
#include "ultramem/kernels/tdqkr.h"

namespace {

namespace uk = ultramem::kernels;
using uk::FeistelPermutation;
using uk::KernelTable;
using uk::PoolShape;
using uk::RowGroups;
using uk::TdqkrShape;
using Rng = std::mt19937;

// =================================================================================================
// Generic helpers
// =================================================================================================

template <typename T>
constexpr T kNaN = std::numeric_limits<T>::quiet_NaN();

// Relative tolerances for comparisons whose association order legitimately differs.
template <typename T>
struct Tol;
template <>
struct Tol<float> {
  static constexpr double kRel = 1e-5;
};
template <>
struct Tol<double> {
  static constexpr double kRel = 1e-12;
};

template <typename T>
void fill_normal(std::vector<T>& x, Rng& rng, double mean = 0.0, double sd = 1.0) {
  std::normal_distribution<double> d(mean, sd);
  for (auto& e : x) e = static_cast<T>(d(rng));
}
template <typename T>
void fill_uniform(std::vector<T>& x, Rng& rng, double lo, double hi) {
  std::uniform_real_distribution<double> d(lo, hi);
  for (auto& e : x) e = static_cast<T>(d(rng));
}
template <typename T>
void fill_int(std::vector<T>& x, Rng& rng, int lo, int hi) {
  std::uniform_int_distribution<int> d(lo, hi);
  for (auto& e : x) e = static_cast<T>(d(rng));
}
template <typename T>
std::vector<T> abs_of(const std::vector<T>& x) {
  std::vector<T> y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = std::abs(x[i]);
  return y;
}

// Bitwise equality (two NaNs count as equal; +0 and -0 do not).
template <typename T>
bool same_value(T a, T b) {
  if constexpr (std::is_floating_point_v<T>) {
    if (std::isnan(a) && std::isnan(b)) return true;
    return std::memcmp(&a, &b, sizeof(T)) == 0;
  } else {
    return a == b;
  }
}

template <typename T>
::testing::AssertionResult Identical(const std::vector<T>& got, const std::vector<T>& want) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << "size " << got.size() << " vs expected " << want.size();
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < got.size(); ++i)
    if (!same_value(got[i], want[i])) {
      if (bad++ == 0) first = i;
    }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << bad << " of " << got.size() << " elements differ; first at ["
                                       << first << "]: got " << std::setprecision(17) << +got[first]
                                       << ", expected " << +want[first];
}

// |got - want| <= rtol * mag elementwise, where mag is the sum of the absolute values of the terms
// that make up each element (so an element made of no terms must be exactly equal).
template <typename T>
::testing::AssertionResult Near(const std::vector<T>& got, const std::vector<T>& want,
                                const std::vector<T>& mag, double rtol) {
  if (got.size() != want.size() || mag.size() != want.size())
    return ::testing::AssertionFailure() << "size mismatch";
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double d = std::abs(double(got[i]) - double(want[i]));
    if (!(d <= rtol * double(mag[i]))) {
      if (bad++ == 0) first = i;
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << bad << " of " << got.size() << " elements out of tolerance; first at ["
                                       << first << "]: got " << std::setprecision(17) << got[first]
                                       << ", expected " << want[first] << ", magnitude " << mag[first]
                                       << ", rtol " << rtol;
}

// The ISA builds of the hot kernels: always "generic", plus "avx2" when the CPU can run it.

template <typename T>
struct NamedTable {
  std::string name;
  KernelTable<T> k;
};

template <typename T>
KernelTable<T> generic_table() {
  KernelTable<T> t{};
  uk::generic::fill_tdqkr(t);
  uk::generic::fill_pool(t);
  return t;
}

template <typename T>
std::vector<NamedTable<T>> isa_tables() {
  std::vector<NamedTable<T>> v;
  v.push_back({"generic", generic_table<T>()});
#if defined(__x86_64__)
  if (ultramem::kernels::cpu_has_avx2_fma()) {
    KernelTable<T> t{};
    uk::avx2::fill_tdqkr(t);
    uk::avx2::fill_pool(t);
    v.push_back({"avx2", t});
  }
#endif
  return v;
}

// Sets the OpenMP thread count for a scope and restores it afterwards.
class OmpThreads {
 public:
  explicit OmpThreads(int n) : saved_(omp_get_max_threads()) { omp_set_num_threads(n); }
  ~OmpThreads() { omp_set_num_threads(saved_); }
  OmpThreads(const OmpThreads&) = delete;
  OmpThreads& operator=(const OmpThreads&) = delete;

 private:
  int saved_;
};

// Number of threads a parallel region actually gets right now.
int team_size() {
  int n = 0;
#pragma omp parallel
  {
#pragma omp single
    n = omp_get_num_threads();
  }
  return n;
}

// The tests run single-threaded unless they set a thread count themselves (the Determinism tests,
// which prove that 2 and 3 threads give bitwise the same results as 1). Reason: most tests make
// hundreds of small kernel calls, and on a loaded 2-core machine every parallel region with spinning
// OpenMP barriers can cost milliseconds, which made the binary 10x slower. The thread count in force
// before the tests is restored afterwards.
class SingleThreadedByDefault : public ::testing::Environment {
 public:
  void SetUp() override {
    saved_ = omp_get_max_threads();
    omp_set_num_threads(1);
  }
  void TearDown() override { omp_set_num_threads(saved_); }

 private:
  int saved_ = 1;
};
::testing::Environment* const kSingleThreaded = ::testing::AddGlobalTestEnvironment(new SingleThreadedByDefault);

// Ordering contract of tdqkr.h, written independently of the kernels: score descending, ties by
// smaller id, NaN last (NaNs among themselves by id). Inputs in these tests never contain infinities.
bool contract_before(double sa, int64_t ia, double sb, int64_t ib) {
  const bool na = std::isnan(sa), nb = std::isnan(sb);
  if (na != nb) return nb;
  if (!na && sa != sb) return sa > sb;
  return ia < ib;
}

// Ids of the k best (score, id) pairs under the contract, best first.
std::vector<int64_t> contract_top(const std::vector<double>& score, const std::vector<int64_t>& id, int64_t k) {
  std::vector<size_t> order(score.size());
  std::iota(order.begin(), order.end(), size_t(0));
  std::sort(order.begin(), order.end(),
            [&](size_t a, size_t b) { return contract_before(score[a], id[a], score[b], id[b]); });
  std::vector<int64_t> out;
  for (int64_t x = 0; x < k; ++x) out.push_back(id[order[x]]);
  return out;
}

// =================================================================================================
// TDQKR problems
// =================================================================================================

std::string describe(const TdqkrShape& s) {
  std::ostringstream o;
  o << "TdqkrShape{T=" << s.T << " H=" << s.H << " r=" << s.r << " n=" << s.n << " C=" << s.C
    << " m_first=" << s.m_first << " m=" << s.m << " m_neg=" << s.m_neg << " filter_rank=" << s.filter_rank << "}";
  return o.str();
}

enum class Fill {
  kGaussian,  // s_row, s_col, u, v ~ N(0,1); cores ~ U(0,1)
  kInteger,   // everything an integer in [-3, 3]: all arithmetic exact, many exact ties
  kPositive,  // s_row, s_col, u, v ~ U(0.1, 1); cores ~ U(0,1)
};

template <typename T>
struct TdqkrProblem {
  TdqkrShape s;
  std::vector<T> s_row, s_col;  // [T, H, r, n]
  std::vector<T> cores;         // [C, H, r, r]
  std::vector<T> u, v;          // [H, r], or [H, R, r] with the rank-R filter

  int64_t side_numel() const { return s.T * s.H * s.r * s.n; }
  int64_t kept() const { return s.T * s.H * s.m; }
  T row(int64_t th, int64_t a, int64_t i) const { return s_row[(th * s.r + a) * s.n + i]; }
  T col(int64_t th, int64_t b, int64_t j) const { return s_col[(th * s.r + b) * s.n + j]; }
  T core(int64_t c, int64_t h, int64_t a, int64_t b) const { return cores[((c * s.H + h) * s.r + a) * s.r + b]; }
};

template <typename T>
TdqkrProblem<T> make_tdqkr(const TdqkrShape& s, uint32_t seed, Fill fill = Fill::kGaussian) {
  TdqkrProblem<T> p;
  p.s = s;
  Rng rng(seed);
  p.s_row.resize(s.T * s.H * s.r * s.n);
  p.s_col.resize(p.s_row.size());
  p.cores.resize(s.C * s.H * s.r * s.r);
  p.u.resize(s.H * s.filter_vectors() * s.r);
  p.v.resize(p.u.size());
  switch (fill) {
    case Fill::kGaussian:
      fill_normal(p.s_row, rng);
      fill_normal(p.s_col, rng);
      fill_uniform(p.cores, rng, 0.0, 1.0);
      fill_normal(p.u, rng);
      fill_normal(p.v, rng);
      break;
    case Fill::kInteger:
      for (auto* x : {&p.s_row, &p.s_col, &p.cores, &p.u, &p.v}) fill_int(*x, rng, -3, 3);
      break;
    case Fill::kPositive:
      fill_uniform(p.s_row, rng, 0.1, 1.0);
      fill_uniform(p.s_col, rng, 0.1, 1.0);
      fill_uniform(p.cores, rng, 0.0, 1.0);
      fill_uniform(p.u, rng, 0.1, 1.0);
      fill_uniform(p.v, rng, 0.1, 1.0);
      break;
  }
  return p;
}

template <typename T>
struct Filtered {
  std::vector<int32_t> row, col;  // [T, H, m_first]
};
template <typename T>
struct Kept {
  std::vector<T> scores;        // [T, H*m, C]
  std::vector<int64_t> index;   // [T, H*m]
};

// Outputs are pre-filled with sentinels so entries a kernel forgets to write are caught.
template <typename T>
Filtered<T> alloc_filtered(const TdqkrShape& s) {
  return {std::vector<int32_t>(s.T * s.H * s.m_first, -7), std::vector<int32_t>(s.T * s.H * s.m_first, -7)};
}
template <typename T>
Kept<T> alloc_kept(const TdqkrShape& s) {
  return {std::vector<T>(s.T * s.H * s.m * s.C, kNaN<T>), std::vector<int64_t>(s.T * s.H * s.m, -7)};
}

template <typename T>
Filtered<T> run_filter(decltype(&uk::tdqkr_filter<T>) fn, const TdqkrProblem<T>& p) {
  Filtered<T> f = alloc_filtered<T>(p.s);
  fn(p.s, p.s_row.data(), p.s_col.data(), p.u.data(), p.v.data(), f.row.data(), f.col.data());
  return f;
}
template <typename T>
Kept<T> run_rescore(decltype(&uk::tdqkr_rescore<T>) fn, const TdqkrProblem<T>& p, const Filtered<T>& f) {
  Kept<T> k = alloc_kept<T>(p.s);
  fn(p.s, p.s_row.data(), p.s_col.data(), p.cores.data(), f.row.data(), f.col.data(), k.scores.data(),
     k.index.data());
  return k;
}
template <typename T>
Kept<T> run_forward(decltype(&uk::tdqkr_forward<T>) fn, const TdqkrProblem<T>& p) {
  Kept<T> k = alloc_kept<T>(p.s);
  fn(p.s, p.s_row.data(), p.s_col.data(), p.cores.data(), p.u.data(), p.v.data(), k.scores.data(),
     k.index.data());
  return k;
}
template <typename T>
Kept<T> run_bruteforce(const TdqkrProblem<T>& p) {
  Kept<T> k = alloc_kept<T>(p.s);
  uk::tdqkr_bruteforce_ref(p.s, p.s_row.data(), p.s_col.data(), p.cores.data(), k.scores.data(), k.index.data());
  return k;
}

template <typename T>
struct TdqkrGrads {
  std::vector<T> ds_row, ds_col, dcores;
};
template <typename T>
TdqkrGrads<T> run_backward(decltype(&uk::tdqkr_backward<T>) fn, const TdqkrProblem<T>& p,
                           const std::vector<int64_t>& index, const std::vector<T>& dscores) {
  TdqkrGrads<T> g{std::vector<T>(p.side_numel(), kNaN<T>), std::vector<T>(p.side_numel(), kNaN<T>),
                  std::vector<T>(p.cores.size(), kNaN<T>)};
  fn(p.s, p.s_row.data(), p.s_col.data(), p.cores.data(), index.data(), dscores.data(), g.ds_row.data(),
     g.ds_col.data(), g.dcores.data());
  return g;
}

// Independent implementation of spec section 4 (filter + rescoring) in double precision, with the
// ordering contract. Exact (hence bit-comparable) when all inputs are small integers (or NaN).
template <typename T>
void spec_tdqkr(const TdqkrProblem<T>& p, Filtered<T>& filt, std::vector<double>& scores,
                std::vector<int64_t>& index) {
  const TdqkrShape& s = p.s;
  filt = alloc_filtered<T>(s);
  scores.assign(s.T * s.H * s.m * s.C, 0.0);
  index.assign(s.T * s.H * s.m, 0);
  std::vector<int64_t> ids(s.n);
  std::iota(ids.begin(), ids.end(), int64_t(0));
  for (int64_t th = 0; th < s.T * s.H; ++th) {
    const int64_t h = th % s.H;
    std::vector<double> fr(s.n, 0.0), fc(s.n, 0.0);
    if (s.filter_rank == 0) {
      for (int64_t i = 0; i < s.n; ++i)
        for (int64_t a = 0; a < s.r; ++a) {
          fr[i] += double(p.u[h * s.r + a]) * double(p.row(th, a, i));
          fc[i] += double(p.v[h * s.r + a]) * double(p.col(th, a, i));
        }
    } else {  // rank-R filter: sum over the R filter vectors of the squared filter scores
      const int64_t R = s.filter_rank;
      for (int64_t i = 0; i < s.n; ++i)
        for (int64_t k = 0; k < R; ++k) {
          double xr = 0, xc = 0;
          for (int64_t a = 0; a < s.r; ++a) {
            xr += double(p.u[(h * R + k) * s.r + a]) * double(p.row(th, a, i));
            xc += double(p.v[(h * R + k) * s.r + a]) * double(p.col(th, a, i));
          }
          fr[i] += xr * xr;
          fc[i] += xc * xc;
        }
    }
    // The top m_pos; two-sign filter: then the m_neg most negative of the rest.
    auto side = [&](const std::vector<double>& f) {
      std::vector<int64_t> out = contract_top(f, ids, s.m_pos());
      std::vector<double> neg;
      std::vector<int64_t> rest;
      for (int64_t i = 0; i < s.n; ++i)
        if (std::find(out.begin(), out.end(), i) == out.end()) {
          neg.push_back(-f[i]);
          rest.push_back(i);
        }
      const auto tail = contract_top(neg, rest, s.m_neg);
      out.insert(out.end(), tail.begin(), tail.end());
      return out;
    };
    const auto top_r = side(fr), top_c = side(fc);
    for (int64_t x = 0; x < s.m_first; ++x) {
      filt.row[th * s.m_first + x] = int32_t(top_r[x]);
      filt.col[th * s.m_first + x] = int32_t(top_c[x]);
    }
    std::vector<double> gsum;
    std::vector<int64_t> addr;
    for (int64_t x = 0; x < s.m_first; ++x)
      for (int64_t y = 0; y < s.m_first; ++y) {
        if (s.m_neg > 0 && (x < s.m_pos()) != (y < s.m_pos())) continue;  // same-sign blocks only
        const int64_t i = top_r[x], j = top_c[y];
        double g = 0;
        for (int64_t c = 0; c < s.C; ++c)
          for (int64_t a = 0; a < s.r; ++a)
            for (int64_t b = 0; b < s.r; ++b)
              g += double(p.row(th, a, i)) * double(p.core(c, h, a, b)) * double(p.col(th, b, j));
        gsum.push_back(g);
        addr.push_back(i * s.n + j);
      }
    const auto kept = contract_top(gsum, addr, s.m);
    for (int64_t k = 0; k < s.m; ++k) {
      const int64_t i = kept[k] / s.n, j = kept[k] % s.n;
      index[th * s.m + k] = kept[k];
      for (int64_t c = 0; c < s.C; ++c) {
        double g = 0;
        for (int64_t a = 0; a < s.r; ++a)
          for (int64_t b = 0; b < s.r; ++b)
            g += double(p.row(th, a, i)) * double(p.core(c, h, a, b)) * double(p.col(th, b, j));
        scores[(th * s.m + k) * s.C + c] = g;
      }
    }
  }
}

// Fixed shape list: the edge cases named in the test plan plus seeded random shapes.
// Aggregate order: {T, H, r, n, C, m_first, m}.
std::vector<TdqkrShape> tdqkr_shapes() {
  std::vector<TdqkrShape> v = {
      {5, 1, 2, 16, 1, 16, 16},  // m = n with m_first = n
      {4, 1, 2, 1, 1, 1, 1},     // n = 1
      {6, 2, 2, 32, 2, 8, 1},    // m = 1, H = 2
      {6, 1, 1, 32, 2, 8, 10},   // r = 1
      {5, 2, 2, 24, 1, 6, 12},   // C = 1
      {5, 2, 2, 24, 3, 6, 12},   // C = 3
      {4, 2, 2, 20, 2, 5, 25},   // m = m_first^2
      {3, 1, 3, 37, 2, 7, 9},    // r = 3, odd n (vector tails)
      {2, 2, 9, 19, 2, 4, 7},    // r*r = 81 > 64 (heap core-sum path)
      {7, 1, 2, 64, 2, 32, 16},  // typical
      {3, 2, 4, 50, 4, 50, 40},  // m_first = n, m < n
      {3, 1, 2, 40, 2, 1, 1},    // m_first = 1
      {0, 2, 2, 16, 2, 4, 8},    // T = 0
      // Two-sign filter: {..., m_neg}.
      {6, 2, 2, 32, 2, 16, 16, 8},     // the split of the retrieval experiments
      {5, 1, 3, 37, 2, 9, 20, 4},      // uneven split, odd n
      {4, 2, 2, 20, 2, 5, 13, 2},      // m = m_pos^2 + m_neg^2
      {3, 1, 2, 40, 2, 2, 2, 1},       // one candidate per end
      {3, 2, 2, 10, 2, 10, 50, 5},     // m_first = n: every row used
      {2, 1, 2, 80, 2, 40, 100, 20},   // m > 64 (the sort path of the rescoring)
      {2, 1, 2, 200, 1, 140, 64, 70},  // m_pos and m_neg > 64 (the sort path of the filter)
      // Rank-R filter: {..., m_neg = 0, filter_rank}.
      {6, 2, 2, 32, 2, 16, 16, 0, 2},    // R = r: the retrieval experiments' setting
      {5, 1, 2, 37, 2, 9, 20, 0, 1},     // R = 1: rows ranked by |f|, odd n
      {4, 2, 3, 40, 2, 8, 30, 0, 2},     // R < r
      {3, 1, 4, 50, 3, 50, 40, 0, 4},    // m_first = n
      {2, 1, 2, 200, 1, 100, 64, 0, 2},  // m_first > 64 (the sort path of the filter)
  };
  Rng rng(1234);
  auto U = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  for (int i = 0; i < 14; ++i) {
    TdqkrShape s;
    s.T = U(1, 12);
    s.H = U(1, 2);
    s.r = U(1, 4);
    s.n = U(1, 80);
    s.C = U(1, 4);
    s.m_first = U(1, s.n);
    s.m_neg = (i % 2 == 1 && s.m_first >= 2) ? U(1, s.m_first - 1) : 0;
    if (i % 4 == 2) s.filter_rank = U(1, s.r);
    s.m = U(1, std::min<int64_t>(s.rescored_pairs(), 48));
    v.push_back(s);
  }
  return v;
}

// =================================================================================================
// Pooled-lookup problems
// =================================================================================================

std::string describe(const PoolShape& s) {
  std::ostringstream o;
  o << "PoolShape{T=" << s.T << " K=" << s.K << " N=" << s.N << " Dv=" << s.Dv << " E=" << s.E << " C=" << s.C
    << "}";
  return o.str();
}

template <typename T>
struct PoolProblem {
  PoolShape s;
  std::vector<T> values;       // [N, Dv]
  std::vector<int64_t> index;  // [T, K]
  std::vector<T> scores;       // [T, K, C]
  std::vector<int64_t> perm;   // [E*N]
  std::vector<T> dout;         // [T, E*Dv]
};

template <typename T>
PoolProblem<T> make_pool(const PoolShape& s, uint32_t seed) {
  PoolProblem<T> p;
  p.s = s;
  Rng rng(seed);
  p.values.resize(s.N * s.Dv);
  p.scores.resize(s.T * s.K * s.C);
  p.dout.resize(s.T * s.E * s.Dv);
  fill_normal(p.values, rng);
  fill_normal(p.scores, rng);
  fill_normal(p.dout, rng);
  p.perm.resize(s.E * s.N);
  std::iota(p.perm.begin(), p.perm.end(), int64_t(0));
  std::shuffle(p.perm.begin(), p.perm.end(), rng);
  std::uniform_int_distribution<int64_t> g(0, s.E * s.N - 1);
  p.index.resize(s.T * s.K);
  for (auto& e : p.index) e = g(rng);
  return p;
}

template <typename T>
std::vector<T> run_pool_forward(decltype(&uk::pooled_lookup_forward<T>) fn, const PoolProblem<T>& p) {
  std::vector<T> out(p.s.T * p.s.E * p.s.Dv, kNaN<T>);
  fn(p.s, p.values.data(), p.index.data(), p.scores.data(), p.perm.data(), out.data());
  return out;
}
template <typename T>
std::vector<T> run_pool_dscores(decltype(&uk::pooled_lookup_backward_scores<T>) fn, const PoolProblem<T>& p) {
  std::vector<T> ds(p.s.T * p.s.K * p.s.C, kNaN<T>);
  fn(p.s, p.values.data(), p.index.data(), p.perm.data(), p.dout.data(), ds.data());
  return ds;
}
// Row-sparse value gradient [U, Dv], as the kernel returns it.
template <typename T>
std::vector<T> run_pool_dvalues_rows(decltype(&uk::pooled_lookup_backward_values<T>) fn, const PoolProblem<T>& p,
                                     const RowGroups& g) {
  std::vector<T> rows(g.rows.size() * p.s.Dv, kNaN<T>);
  fn(p.s, g, p.scores.data(), p.dout.data(), rows.data());
  return rows;
}
// The same, scattered into a dense [N, Dv] (rows never hit stay zero).
template <typename T>
std::vector<T> run_pool_dvalues_dense(decltype(&uk::pooled_lookup_backward_values<T>) fn, const PoolProblem<T>& p) {
  RowGroups g;
  uk::group_hits_by_row(p.s, p.index.data(), p.perm.data(), g);
  const std::vector<T> rows = run_pool_dvalues_rows(fn, p, g);
  std::vector<T> dense(p.s.N * p.s.Dv, T(0));
  for (size_t u = 0; u < g.rows.size(); ++u)
    std::copy(rows.begin() + u * p.s.Dv, rows.begin() + (u + 1) * p.s.Dv, dense.begin() + g.rows[u] * p.s.Dv);
  return dense;
}

// Aggregate order: {T, K, N, Dv, E, C}.
std::vector<PoolShape> pool_shapes() {
  std::vector<PoolShape> v = {
      {7, 12, 50, 16, 1, 1},     // E = 1, C = 1
      {7, 12, 50, 16, 4, 2},     // E = 4, C = 2
      {5, 9, 30, 24, 9, 4},      // E = 9, C = 4
      {3, 5, 11, 12, 4, 4},      // Ds = 3
      {4, 6, 13, 13, 1, 1},      // odd Dv
      {9, 20, 40, 104, 4, 2},    // Ds = 52: full 8-lane blocks plus tail
      {200, 32, 3, 8, 4, 2},     // many tokens hitting the same few rows
      {150, 40, 1, 12, 9, 4},    // a single physical row
      {30, 64, 17, 40, 9, 1},
      {1, 1, 1, 4, 1, 4},        // N = 1, Ds = 1
      {0, 8, 10, 8, 4, 2},       // T = 0
      {6, 0, 10, 8, 4, 2},       // K = 0
  };
  Rng rng(4321);
  auto U = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  const int64_t Es[] = {1, 4, 9}, Cs[] = {1, 2, 4};
  for (int i = 0; i < 10; ++i) {
    PoolShape s;
    s.T = U(1, 24);
    s.K = U(1, 40);
    s.N = U(1, 200);
    s.E = Es[U(0, 2)];
    s.C = Cs[U(0, 2)];
    s.Dv = s.C * U(1, 20);
    v.push_back(s);
  }
  return v;
}

// Checks every documented invariant of RowGroups against the hits it was built from.
::testing::AssertionResult RowGroupsValid(const PoolShape& s, const int64_t* index, const int64_t* perm,
                                          const RowGroups& g) {
  const int64_t total = s.T * s.K;
  const size_t U = g.rows.size();
  auto fail = [] { return ::testing::AssertionFailure(); };
  if (g.offsets.size() != U + 1) return fail() << "offsets.size() " << g.offsets.size() << " != U+1 = " << U + 1;
  if (int64_t(g.entries.size()) != total) return fail() << "entries.size() " << g.entries.size() << " != T*K";
  if (int64_t(g.groups.size()) != total) return fail() << "groups.size() " << g.groups.size() << " != T*K";
  if (g.offsets.front() != 0 || g.offsets.back() != total) return fail() << "offsets must span [0, T*K]";
  if (total > 0 && U == 0) return fail() << "no rows for a non-empty batch";
  std::vector<char> seen(total, 0);
  for (size_t u = 0; u < U; ++u) {
    if (g.rows[u] < 0 || g.rows[u] >= s.N) return fail() << "rows[" << u << "] = " << g.rows[u] << " out of range";
    if (u > 0 && g.rows[u] <= g.rows[u - 1]) return fail() << "rows not strictly ascending at " << u;
    if (g.offsets[u + 1] <= g.offsets[u]) return fail() << "row " << u << " has no entries";
    for (int64_t e = g.offsets[u]; e < g.offsets[u + 1]; ++e) {
      const int64_t hit = g.entries[e];
      if (hit < 0 || hit >= total) return fail() << "entries[" << e << "] = " << hit << " out of range";
      if (seen[hit]++) return fail() << "hit " << hit << " listed twice";
      if (e > g.offsets[u] && hit <= g.entries[e - 1]) return fail() << "entries not ascending within row " << u;
      const int64_t v = perm[index[hit]];
      if (v % s.N != g.rows[u]) return fail() << "hit " << hit << " is in row " << v % s.N << ", grouped under " << g.rows[u];
      if (g.groups[e] != v / s.N) return fail() << "groups[" << e << "] = " << g.groups[e] << ", expected " << v / s.N;
    }
  }
  return ::testing::AssertionSuccess();
}

// =================================================================================================
// Small dense linear algebra for the recall tests
// =================================================================================================

// Top singular pair of the r x r row-major matrix M: power iteration on M^T M for v, u = M v / |M v|.
// Sign chosen so that sum(u) >= 0. Returns sigma_1.
double top_singular_pair(const std::vector<double>& M, int64_t r, std::vector<double>& u, std::vector<double>& v) {
  v.assign(r, 1.0 / std::sqrt(double(r)));
  u.assign(r, 0.0);
  std::vector<double> Mv(r), w(r);
  auto normalise = [](std::vector<double>& x) {
    double n2 = 0;
    for (double e : x) n2 += e * e;
    const double n = std::sqrt(n2);
    for (double& e : x) e /= n;
    return n;
  };
  for (int it = 0; it < 2000; ++it) {
    for (int64_t a = 0; a < r; ++a) {
      Mv[a] = 0;
      for (int64_t b = 0; b < r; ++b) Mv[a] += M[a * r + b] * v[b];
    }
    for (int64_t b = 0; b < r; ++b) {
      w[b] = 0;
      for (int64_t a = 0; a < r; ++a) w[b] += M[a * r + b] * Mv[a];
    }
    normalise(w);
    v = w;
  }
  for (int64_t a = 0; a < r; ++a) {
    u[a] = 0;
    for (int64_t b = 0; b < r; ++b) u[a] += M[a * r + b] * v[b];
  }
  const double sigma = normalise(u);
  if (std::accumulate(u.begin(), u.end(), 0.0) < 0) {
    for (double& e : u) e = -e;
    for (double& e : v) e = -e;
  }
  return sigma;
}

// Mean over (token, head) of |kernel kept set ∩ brute-force kept set| / m.
template <typename T>
double recall(const TdqkrShape& s, const std::vector<int64_t>& got, const std::vector<int64_t>& truth) {
  double sum = 0;
  for (int64_t th = 0; th < s.T * s.H; ++th) {
    std::vector<int64_t> a(got.begin() + th * s.m, got.begin() + (th + 1) * s.m);
    std::vector<int64_t> b(truth.begin() + th * s.m, truth.begin() + (th + 1) * s.m);
    std::sort(a.begin(), a.end());
    std::sort(b.begin(), b.end());
    std::vector<int64_t> both;
    std::set_intersection(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(both));
    sum += double(both.size()) / double(s.m);
  }
  return sum / double(s.T * s.H);
}

// Replaces u, v of p by the top singular vectors of each head's core sum (spec section 4, step 1).
template <typename T>
void set_svd_filter(TdqkrProblem<T>& p) {
  const TdqkrShape& s = p.s;
  for (int64_t h = 0; h < s.H; ++h) {
    std::vector<double> csum(s.r * s.r, 0.0), u, v;
    for (int64_t c = 0; c < s.C; ++c)
      for (int64_t a = 0; a < s.r; ++a)
        for (int64_t b = 0; b < s.r; ++b) csum[a * s.r + b] += double(p.core(c, h, a, b));
    top_singular_pair(csum, s.r, u, v);
    for (int64_t a = 0; a < s.r; ++a) {
      p.u[h * s.r + a] = T(u[a]);
      p.v[h * s.r + a] = T(v[a]);
    }
  }
}

// Replaces u, v of p ([H, R, r], R = s.filter_rank) by the R leading singular pairs of each head's core
// sum, each scaled by sqrt(sigma_k) (found one at a time, deflating the matrix).
template <typename T>
void set_rank_r_filter(TdqkrProblem<T>& p) {
  const TdqkrShape& s = p.s;
  const int64_t R = s.filter_rank, r = s.r;
  p.u.assign(s.H * R * r, T(0));
  p.v.assign(p.u.size(), T(0));
  for (int64_t h = 0; h < s.H; ++h) {
    std::vector<double> csum(r * r, 0.0), u, v;
    for (int64_t c = 0; c < s.C; ++c)
      for (int64_t a = 0; a < r; ++a)
        for (int64_t b = 0; b < r; ++b) csum[a * r + b] += double(p.core(c, h, a, b));
    for (int64_t k = 0; k < R; ++k) {
      const double sigma = top_singular_pair(csum, r, u, v), w = std::sqrt(sigma);
      for (int64_t a = 0; a < r; ++a) {
        p.u[(h * R + k) * r + a] = T(w * u[a]);
        p.v[(h * R + k) * r + a] = T(w * v[a]);
      }
      for (int64_t a = 0; a < r; ++a)
        for (int64_t b = 0; b < r; ++b) csum[a * r + b] -= sigma * u[a] * v[b];
    }
  }
}

// =================================================================================================
// Typed fixtures
// =================================================================================================

template <typename T>
class TdqkrKernels : public ::testing::Test {};
template <typename T>
class PoolKernels : public ::testing::Test {};
template <typename T>
class Determinism : public ::testing::Test {};
template <typename T>
class IsaAgreement : public ::testing::Test {};
using FloatTypes = ::testing::Types<float, double>;
TYPED_TEST_SUITE(TdqkrKernels, FloatTypes);
TYPED_TEST_SUITE(PoolKernels, FloatTypes);
TYPED_TEST_SUITE(Determinism, FloatTypes);
TYPED_TEST_SUITE(IsaAgreement, FloatTypes);

// =================================================================================================
// 1. TDQKR kernels vs scalar references (bit-identical by design)
// =================================================================================================

TYPED_TEST(TdqkrKernels, FilterMatchesRefBitwise) {
  using T = TypeParam;
  uint32_t seed = 10;
  for (const TdqkrShape& s : tdqkr_shapes()) {
    SCOPED_TRACE(describe(s));
    ASSERT_EQ(uk::tdqkr_check_shape(s), nullptr);
    const auto p = make_tdqkr<T>(s, seed++);
    const auto want = run_filter<T>(&uk::tdqkr_filter_ref<T>, p);
    for (const auto& tab : isa_tables<T>()) {
      SCOPED_TRACE(tab.name);
      const auto got = run_filter<T>(tab.k.tdqkr_filter, p);
      EXPECT_TRUE(Identical(got.row, want.row)) << "idx_row";
      EXPECT_TRUE(Identical(got.col, want.col)) << "idx_col";
    }
    const auto pub = run_filter<T>(&uk::tdqkr_filter<T>, p);
    EXPECT_TRUE(Identical(pub.row, want.row)) << "public idx_row";
    EXPECT_TRUE(Identical(pub.col, want.col)) << "public idx_col";
  }
}

TYPED_TEST(TdqkrKernels, RescoreMatchesRefBitwise) {
  using T = TypeParam;
  uint32_t seed = 20;
  for (const TdqkrShape& s : tdqkr_shapes()) {
    SCOPED_TRACE(describe(s));
    const auto p = make_tdqkr<T>(s, seed++);
    const auto f = run_filter<T>(&uk::tdqkr_filter_ref<T>, p);
    const auto want = run_rescore<T>(&uk::tdqkr_rescore_ref<T>, p, f);
    for (const auto& tab : isa_tables<T>()) {
      SCOPED_TRACE(tab.name);
      const auto got = run_rescore<T>(tab.k.tdqkr_rescore, p, f);
      EXPECT_TRUE(Identical(got.index, want.index)) << "index";
      EXPECT_TRUE(Identical(got.scores, want.scores)) << "scores";
    }
  }
}

// A rescoring of arbitrary (not filter-produced) candidate lists: reversed and shuffled order.
TYPED_TEST(TdqkrKernels, RescoreArbitraryCandidateOrder) {
  using T = TypeParam;
  const TdqkrShape s{6, 2, 3, 30, 2, 9, 20};
  const auto p = make_tdqkr<T>(s, 30);
  Filtered<T> f = alloc_filtered<T>(s);
  Rng rng(31);
  for (int64_t th = 0; th < s.T * s.H; ++th) {
    std::vector<int32_t> all(s.n);
    std::iota(all.begin(), all.end(), 0);
    std::shuffle(all.begin(), all.end(), rng);
    std::copy(all.begin(), all.begin() + s.m_first, f.row.begin() + th * s.m_first);
    std::shuffle(all.begin(), all.end(), rng);
    std::copy(all.begin(), all.begin() + s.m_first, f.col.begin() + th * s.m_first);
  }
  const auto want = run_rescore<T>(&uk::tdqkr_rescore_ref<T>, p, f);
  for (const auto& tab : isa_tables<T>()) {
    SCOPED_TRACE(tab.name);
    const auto got = run_rescore<T>(tab.k.tdqkr_rescore, p, f);
    EXPECT_TRUE(Identical(got.index, want.index));
    EXPECT_TRUE(Identical(got.scores, want.scores));
  }
}

TYPED_TEST(TdqkrKernels, ForwardEqualsFilterPlusRescore) {
  using T = TypeParam;
  uint32_t seed = 40;
  for (const TdqkrShape& s : tdqkr_shapes()) {
    SCOPED_TRACE(describe(s));
    const auto p = make_tdqkr<T>(s, seed++);
    const auto want = run_rescore<T>(&uk::tdqkr_rescore_ref<T>, p, run_filter<T>(&uk::tdqkr_filter_ref<T>, p));
    for (const auto& tab : isa_tables<T>()) {
      SCOPED_TRACE(tab.name);
      const auto got = run_forward<T>(tab.k.tdqkr_forward, p);
      const auto staged = run_rescore<T>(tab.k.tdqkr_rescore, p, run_filter<T>(tab.k.tdqkr_filter, p));
      EXPECT_TRUE(Identical(got.index, staged.index)) << "forward vs filter+rescore: index";
      EXPECT_TRUE(Identical(got.scores, staged.scores)) << "forward vs filter+rescore: scores";
      EXPECT_TRUE(Identical(got.index, want.index)) << "forward vs refs: index";
      EXPECT_TRUE(Identical(got.scores, want.scores)) << "forward vs refs: scores";
    }
    const auto pub = run_forward<T>(&uk::tdqkr_forward<T>, p);
    EXPECT_TRUE(Identical(pub.index, want.index)) << "public forward: index";
    EXPECT_TRUE(Identical(pub.scores, want.scores)) << "public forward: scores";
  }
}

// Kernel output vs the spec formula computed here in double: per-core scores, kept addresses come
// from the filtered rows x cols, are distinct, and are ordered by their summed score.
TYPED_TEST(TdqkrKernels, ForwardMatchesSpecFormula) {
  using T = TypeParam;
  uint32_t seed = 50;
  for (const TdqkrShape& s : tdqkr_shapes()) {
    SCOPED_TRACE(describe(s));
    const auto p = make_tdqkr<T>(s, seed++);
    const auto f = run_filter<T>(&uk::tdqkr_filter_ref<T>, p);
    const auto got = run_forward<T>(&uk::tdqkr_forward<T>, p);
    for (int64_t th = 0; th < s.T * s.H; ++th) {
      const int64_t h = th % s.H;
      std::vector<int64_t> seen;
      double prev = std::numeric_limits<double>::infinity();
      for (int64_t k = 0; k < s.m; ++k) {
        const int64_t g = got.index[th * s.m + k], i = g / s.n, j = g % s.n;
        ASSERT_TRUE(g >= 0 && g < s.n * s.n) << "address " << g;
        const auto* fr = &f.row[th * s.m_first];
        const auto* fc = &f.col[th * s.m_first];
        ASSERT_NE(std::find(fr, fr + s.m_first, i), fr + s.m_first) << "row " << i << " not in the filtered set";
        ASSERT_NE(std::find(fc, fc + s.m_first, j), fc + s.m_first) << "col " << j << " not in the filtered set";
        if (s.m_neg > 0) {
          const bool row_pos = std::find(fr, fr + s.m_first, i) - fr < s.m_pos();
          const bool col_pos = std::find(fc, fc + s.m_first, j) - fc < s.m_pos();
          ASSERT_EQ(row_pos, col_pos) << "two-sign filter: a pair from different-sign blocks, k=" << k;
        }
        seen.push_back(g);
        double sum = 0, mag = 0;
        for (int64_t c = 0; c < s.C; ++c) {
          double want = 0, wmag = 0;
          for (int64_t a = 0; a < s.r; ++a)
            for (int64_t b = 0; b < s.r; ++b) {
              const double term = double(p.row(th, a, i)) * double(p.core(c, h, a, b)) * double(p.col(th, b, j));
              want += term;
              wmag += std::abs(term);
            }
          const double have = double(got.scores[(th * s.m + k) * s.C + c]);
          EXPECT_NEAR(have, want, 8 * Tol<T>::kRel * (wmag + 1e-30)) << "t*H+h=" << th << " k=" << k << " c=" << c;
          sum += want;
          mag += wmag;
        }
        EXPECT_LE(sum, prev + 8 * Tol<T>::kRel * mag) << "kept candidates not ordered by score, k=" << k;
        prev = sum;
      }
      std::sort(seen.begin(), seen.end());
      EXPECT_EQ(std::adjacent_find(seen.begin(), seen.end()), seen.end()) << "duplicate address";
    }
  }
}

// =================================================================================================
// 2. Edge cases: exact ties, NaN, T = 0
// =================================================================================================

// Integer inputs: all arithmetic exact, so many exact ties; ties must go to the smaller index (filter)
// and the smaller grid address (rescoring). Checked against the independent spec implementation.
TYPED_TEST(TdqkrKernels, IntegerTiesFollowOrderingContract) {
  using T = TypeParam;
  std::vector<TdqkrShape> shapes = {
      {8, 2, 2, 24, 2, 6, 12}, {8, 1, 1, 16, 1, 8, 30}, {5, 2, 2, 16, 3, 16, 40},
      {6, 1, 3, 33, 2, 5, 25}, {4, 2, 2, 1, 2, 1, 1},   {5, 1, 2, 12, 2, 12, 144},
      {8, 2, 2, 24, 2, 6, 12, 3}, {5, 1, 2, 12, 2, 12, 72, 6}, {6, 1, 1, 16, 2, 8, 20, 3},
      {8, 2, 2, 24, 2, 6, 12, 0, 2}, {6, 1, 3, 33, 2, 5, 25, 0, 1}};
  uint32_t seed = 60;
  for (const TdqkrShape& s : shapes) {
    SCOPED_TRACE(describe(s));
    for (int zero = 0; zero < 2; ++zero) {
      auto p = make_tdqkr<T>(s, seed++, Fill::kInteger);
      if (zero) std::fill(p.s_row.begin(), p.s_row.end(), T(0));  // every score ties at exactly 0
      SCOPED_TRACE(zero ? "all-zero s_row" : "random integers");
      Filtered<T> want_f;
      std::vector<double> want_scores;
      std::vector<int64_t> want_index;
      spec_tdqkr(p, want_f, want_scores, want_index);
      std::vector<T> want_scores_t(want_scores.begin(), want_scores.end());
      if (zero) {
        for (int64_t th = 0; th < s.T * s.H; ++th)
          for (int64_t x = 0; x < s.m_first; ++x) ASSERT_EQ(want_f.row[th * s.m_first + x], x);
      }
      for (const auto& tab : isa_tables<T>()) {
        SCOPED_TRACE(tab.name);
        const auto f = run_filter<T>(tab.k.tdqkr_filter, p);
        EXPECT_TRUE(Identical(f.row, want_f.row)) << "idx_row";
        EXPECT_TRUE(Identical(f.col, want_f.col)) << "idx_col";
        const auto got = run_forward<T>(tab.k.tdqkr_forward, p);
        EXPECT_TRUE(Identical(got.index, want_index)) << "index";
        EXPECT_TRUE(Identical(got.scores, want_scores_t)) << "scores";
      }
      const auto ref = run_rescore<T>(&uk::tdqkr_rescore_ref<T>, p, run_filter<T>(&uk::tdqkr_filter_ref<T>, p));
      EXPECT_TRUE(Identical(ref.index, want_index)) << "reference index";
      const auto bf = run_bruteforce<T>(p);
      if (s.m_first == s.n && s.m_neg == 0) { EXPECT_TRUE(Identical(bf.index, want_index)) << "brute force index"; }
    }
  }
}

// The threshold selection (select_top_k: filter n >= 8 m_first, rescoring m_first^2 >= 8 m) with exact
// ties, NaN and infinite scores: every ISA equals the references.
TYPED_TEST(TdqkrKernels, ThresholdSelectionWithTiesAndSpecialValues) {
  using T = TypeParam;
  const std::vector<TdqkrShape> shapes = {{6, 2, 2, 256, 2, 16, 16}, {4, 1, 2, 512, 2, 32, 32, 16},
                                          {3, 2, 1, 200, 1, 24, 20}};
  uint32_t seed = 400;
  for (const TdqkrShape& s : shapes)
    for (int variant = 0; variant < 3; ++variant) {
      SCOPED_TRACE(describe(s) + " variant " + std::to_string(variant));
      auto p = make_tdqkr<T>(s, seed++, variant == 0 ? Fill::kInteger : Fill::kGaussian);
      Rng rng(seed);
      for (auto* x : {&p.s_row, &p.s_col})
        for (auto& e : *x) {
          if (variant == 1 && rng() % 17 == 0) e = kNaN<T>;
          if (variant == 2 && rng() % 19 == 0) e = (rng() % 2 ? 1 : -1) * std::numeric_limits<T>::infinity();
        }
      const auto want_f = run_filter<T>(&uk::tdqkr_filter_ref<T>, p);
      const auto want = run_rescore<T>(&uk::tdqkr_rescore_ref<T>, p, want_f);
      for (const auto& tab : isa_tables<T>()) {
        SCOPED_TRACE(tab.name);
        const auto f = run_filter<T>(tab.k.tdqkr_filter, p);
        EXPECT_TRUE(Identical(f.row, want_f.row)) << "idx_row";
        EXPECT_TRUE(Identical(f.col, want_f.col)) << "idx_col";
        const auto got = run_rescore<T>(tab.k.tdqkr_rescore, p, want_f);
        EXPECT_TRUE(Identical(got.index, want.index)) << "index";
        EXPECT_TRUE(Identical(got.scores, want.scores)) << "scores";
      }
    }
}

// NaN scores rank last (after every finite score, NaNs among themselves by index) and do not crash.
TYPED_TEST(TdqkrKernels, NaNInputsRankLast) {
  using T = TypeParam;
  const TdqkrShape s{6, 2, 2, 16, 2, 16, 256};  // keep every row, col and candidate: the full order is visible
  auto p = make_tdqkr<T>(s, 70, Fill::kInteger);
  const int64_t rn = s.r * s.n;
  // token 0, head 0: rows 3 and 11 NaN.       token 1, head 1: col 0 NaN.
  p.s_row[(0 * s.H + 0) * rn + 0 * s.n + 3] = kNaN<T>;
  p.s_row[(0 * s.H + 0) * rn + 1 * s.n + 11] = kNaN<T>;
  p.s_col[(1 * s.H + 1) * rn + 1 * s.n + 0] = kNaN<T>;
  // token 2: everything NaN.
  std::fill(p.s_row.begin() + 2 * s.H * rn, p.s_row.begin() + 3 * s.H * rn, kNaN<T>);
  std::fill(p.s_col.begin() + 2 * s.H * rn, p.s_col.begin() + 3 * s.H * rn, kNaN<T>);
  // core 1 of head 1 NaN: every summed score of head 1 is NaN (filter unaffected).
  for (int64_t e = 0; e < s.r * s.r; ++e) p.cores[(1 * s.H + 1) * s.r * s.r + e] = kNaN<T>;

  Filtered<T> want_f;
  std::vector<double> want_scores;
  std::vector<int64_t> want_index;
  spec_tdqkr(p, want_f, want_scores, want_index);
  const std::vector<T> want_scores_t(want_scores.begin(), want_scores.end());
  // The independent expectation has the NaN rows last, in index order.
  const int32_t* r0 = &want_f.row[0];
  EXPECT_EQ(r0[s.n - 2], 3);
  EXPECT_EQ(r0[s.n - 1], 11);
  for (int64_t x = 0; x < s.n; ++x) EXPECT_EQ(want_f.row[2 * s.H * s.n + x], x) << "all-NaN token";

  const auto ref_f = run_filter<T>(&uk::tdqkr_filter_ref<T>, p);
  const auto ref = run_rescore<T>(&uk::tdqkr_rescore_ref<T>, p, ref_f);
  EXPECT_TRUE(Identical(ref_f.row, want_f.row));
  EXPECT_TRUE(Identical(ref.index, want_index));
  for (const auto& tab : isa_tables<T>()) {
    SCOPED_TRACE(tab.name);
    const auto f = run_filter<T>(tab.k.tdqkr_filter, p);
    EXPECT_TRUE(Identical(f.row, want_f.row)) << "idx_row";
    EXPECT_TRUE(Identical(f.col, want_f.col)) << "idx_col";
    const auto got = run_forward<T>(tab.k.tdqkr_forward, p);
    EXPECT_TRUE(Identical(got.index, want_index)) << "index";
    EXPECT_TRUE(Identical(got.scores, want_scores_t)) << "scores";
    // Token 0 head 0: the last 2*16 kept candidates are exactly those on NaN rows 3 and 11.
    for (int64_t k = 0; k < s.m; ++k) {
      const int64_t i = got.index[k] / s.n;
      EXPECT_EQ(k >= s.m - 2 * s.n, i == 3 || i == 11) << "k=" << k << " row " << i;
    }
  }
  // Smaller m: NaN candidates must not be kept while finite ones remain.
  TdqkrShape s2 = s;
  s2.m_first = 8;
  s2.m = 20;
  auto p2 = p;
  p2.s = s2;
  const auto got2 = run_forward<T>(&uk::tdqkr_forward<T>, p2);
  const auto f2 = run_filter<T>(&uk::tdqkr_filter<T>, p2);
  for (int64_t x = 0; x < s2.m_first; ++x) EXPECT_TRUE(f2.row[x] != 3 && f2.row[x] != 11) << "NaN row kept";
  for (int64_t k = 0; k < s2.m; ++k) EXPECT_FALSE(std::isnan(got2.scores[k * s2.C])) << "NaN candidate kept, k=" << k;
}

// NaN must rank after a genuine -inf score (regression: NaN used to be mapped to -inf and tie with it).
TYPED_TEST(TdqkrKernels, NaNRanksAfterMinusInfinity) {
  using T = TypeParam;
  const TdqkrShape s{1, 1, 1, 4, 1, 4, 1};
  TdqkrProblem<T> p = make_tdqkr<T>(s, 1);
  p.s_row = {kNaN<T>, -std::numeric_limits<T>::infinity(), T(1), T(2)};  // f_row = s_row (u = 1)
  p.u = {T(1)};
  const std::vector<int32_t> want = {3, 2, 1, 0};
  for (const auto& tab : isa_tables<T>()) {
    SCOPED_TRACE(tab.name);
    EXPECT_TRUE(Identical(run_filter<T>(tab.k.tdqkr_filter, p).row, want));
  }
  EXPECT_TRUE(Identical(run_filter<T>(&uk::tdqkr_filter_ref<T>, p).row, want)) << "reference";
}

TYPED_TEST(TdqkrKernels, ZeroTokensIsANoOp) {
  using T = TypeParam;
  const TdqkrShape s{0, 2, 2, 16, 3, 4, 8};
  ASSERT_EQ(uk::tdqkr_check_shape(s), nullptr);
  const auto p = make_tdqkr<T>(s, 80);
  for (const auto& tab : isa_tables<T>()) {
    SCOPED_TRACE(tab.name);
    const auto f = run_filter<T>(tab.k.tdqkr_filter, p);
    const auto k = run_rescore<T>(tab.k.tdqkr_rescore, p, f);
    const auto fw = run_forward<T>(tab.k.tdqkr_forward, p);
    EXPECT_TRUE(f.row.empty() && k.index.empty() && fw.index.empty());
    const auto g = run_backward<T>(tab.k.tdqkr_backward, p, fw.index, fw.scores);
    EXPECT_TRUE(Identical(g.dcores, std::vector<T>(p.cores.size(), T(0)))) << "dcores must be overwritten with 0";
  }
  const auto bf = run_bruteforce<T>(p);
  EXPECT_TRUE(bf.index.empty());
}

// =================================================================================================
// 3. TDQKR exactness and recall vs brute force
// =================================================================================================

TYPED_TEST(TdqkrKernels, FullFirstStageEqualsBruteForce) {
  using T = TypeParam;
  const std::vector<TdqkrShape> shapes = {{6, 1, 2, 32, 2, 32, 16}, {4, 2, 3, 21, 3, 21, 50},
                                          {5, 2, 1, 8, 1, 8, 64},   {3, 1, 2, 1, 2, 1, 1},
                                          {4, 2, 9, 12, 2, 12, 10}, {5, 1, 4, 40, 4, 40, 40}};
  uint32_t seed = 90;
  for (const TdqkrShape& s : shapes) {
    SCOPED_TRACE(describe(s));
    const auto p = make_tdqkr<T>(s, seed++);
    const auto want = run_bruteforce<T>(p);
    for (const auto& tab : isa_tables<T>()) {
      SCOPED_TRACE(tab.name);
      const auto got = run_forward<T>(tab.k.tdqkr_forward, p);
      EXPECT_TRUE(Identical(got.index, want.index)) << "index";
      EXPECT_TRUE(Identical(got.scores, want.scores)) << "per-core scores";
    }
  }
}

// The fast whole-grid top-m (retrieval telemetry) against the brute-force reference, bit for bit.
TYPED_TEST(TdqkrKernels, ExactMatchesBruteForceBitwise) {
  using T = TypeParam;
  const std::vector<TdqkrShape> shapes = {{6, 1, 2, 32, 2, 4, 16}, {4, 2, 3, 21, 3, 21, 50}, {5, 2, 1, 8, 1, 8, 64},
                                          {3, 1, 2, 1, 2, 1, 1},   {4, 2, 9, 12, 2, 3, 10},  {2, 1, 2, 12, 2, 12, 100},
                                          {0, 2, 2, 16, 2, 4, 8},  {3, 2, 2, 37, 2, 8, 32, 4}};
  uint32_t seed = 95;
  for (const TdqkrShape& s : shapes) {
    SCOPED_TRACE(describe(s));
    for (int integer = 0; integer < 2; ++integer) {
      const auto p = make_tdqkr<T>(s, seed++, integer ? Fill::kInteger : Fill::kGaussian);
      const auto want = run_bruteforce<T>(p);
      auto run_exact = [&](decltype(&uk::tdqkr_exact<T>) fn) {
        Kept<T> k = alloc_kept<T>(s);
        fn(s, p.s_row.data(), p.s_col.data(), p.cores.data(), k.scores.data(), k.index.data());
        return k;
      };
      for (const auto& tab : isa_tables<T>()) {
        SCOPED_TRACE(tab.name);
        const auto got = run_exact(tab.k.tdqkr_exact);
        EXPECT_TRUE(Identical(got.index, want.index)) << "index";
        EXPECT_TRUE(Identical(got.scores, want.scores)) << "per-core scores";
      }
      const auto pub = run_exact(&uk::tdqkr_exact<T>);
      EXPECT_TRUE(Identical(pub.index, want.index)) << "public index";
    }
  }
}

// Shapes the two-sign filter rejects, each with a message naming the field.
TEST(TdqkrShapeCheck, TwoSignSplitErrorsNameTheField) {
  TdqkrShape s{1, 1, 2, 32, 2, 16, 16, 16};  // m_neg = m_first: no positive end
  ASSERT_NE(uk::tdqkr_check_shape(s), nullptr);
  EXPECT_NE(std::string(uk::tdqkr_check_shape(s)).find("m_neg"), std::string::npos);
  s.m_neg = -1;
  EXPECT_NE(std::string(uk::tdqkr_check_shape(s)).find("m_neg"), std::string::npos);
  s = {1, 1, 2, 32, 2, 4, 9, 2};  // 2*2 + 2*2 = 8 pairs < m = 9
  ASSERT_NE(uk::tdqkr_check_shape(s), nullptr);
  EXPECT_NE(std::string(uk::tdqkr_check_shape(s)).find("m_pos^2 + m_neg^2"), std::string::npos);
  s.m = 8;
  EXPECT_EQ(uk::tdqkr_check_shape(s), nullptr);
}

// Rank-R filter settings the kernels reject: a rank above r, a negative rank, a two-sign split with it.
TEST(TdqkrShapeCheck, RankRFilterErrorsNameTheField) {
  TdqkrShape s{1, 1, 2, 32, 2, 16, 16, 0, 3};  // R = 3 > r = 2
  ASSERT_NE(uk::tdqkr_check_shape(s), nullptr);
  EXPECT_NE(std::string(uk::tdqkr_check_shape(s)).find("filter_rank"), std::string::npos);
  s.filter_rank = -1;
  ASSERT_NE(uk::tdqkr_check_shape(s), nullptr);
  EXPECT_NE(std::string(uk::tdqkr_check_shape(s)).find("filter_rank"), std::string::npos);
  s.filter_rank = 2;
  EXPECT_EQ(uk::tdqkr_check_shape(s), nullptr);
  s.m_neg = 4;
  ASSERT_NE(uk::tdqkr_check_shape(s), nullptr);
  EXPECT_NE(std::string(uk::tdqkr_check_shape(s)).find("m_neg"), std::string::npos);
  s.m_neg = 0;
  s.m = 16 * 16;  // every pair is rescored
  EXPECT_EQ(uk::tdqkr_check_shape(s), nullptr);
}

// Filter score (spec section 4, step 1) of row / col x of (token, head) th, in double.
template <typename T>
double filter_score(const TdqkrProblem<T>& p, int64_t th, bool col, int64_t x) {
  const int64_t h = th % p.s.H;
  double f = 0;
  for (int64_t a = 0; a < p.s.r; ++a)
    f += col ? double(p.v[h * p.s.r + a]) * double(p.col(th, a, x)) : double(p.u[h * p.s.r + a]) * double(p.row(th, a, x));
  return f;
}

// The power-iteration helper against the closed form of a 2x2 SVD and the defining identities.
TEST(TestHelpers, TopSingularPair) {
  Rng rng(7);
  std::uniform_real_distribution<double> U(0.0, 2.0);
  for (int rep = 0; rep < 20; ++rep) {
    const int64_t r = 2 + rep % 3;
    std::vector<double> M(r * r), u, v;
    for (double& e : M) e = U(rng);
    const double sigma = top_singular_pair(M, r, u, v);
    for (int64_t a = 0; a < r; ++a) {
      double Mv = 0, MTu = 0;
      for (int64_t b = 0; b < r; ++b) {
        Mv += M[a * r + b] * v[b];
        MTu += M[b * r + a] * u[b];
      }
      EXPECT_NEAR(Mv, sigma * u[a], 1e-9);   // M v = sigma u
      EXPECT_NEAR(MTu, sigma * v[a], 1e-9);  // M^T u = sigma v
    }
    if (r == 2) {  // sigma_1^2 = (|M|_F^2 + sqrt(|M|_F^4 - 4 det^2)) / 2
      const double f2 = M[0] * M[0] + M[1] * M[1] + M[2] * M[2] + M[3] * M[3], det = M[0] * M[3] - M[1] * M[2];
      EXPECT_NEAR(sigma, std::sqrt((f2 + std::sqrt(f2 * f2 - 4 * det * det)) / 2), 1e-9);
    }
  }
}

// Recall of TDQKR vs brute force with cores ~ U(0,1) and the filter (u, v) = top singular vectors of
// the core sum. s_row, s_col ~ N(mean, 1).
//
// With zero-mean scores about half of the true top-m have f_row < 0 and f_col < 0 (the product of two
// negative filter scores is large and positive), and the top-m_first filter, which keeps the largest
// f only, can never find those: overall recall is ~0.5 by construction of the algorithm, not a kernel
// defect. The candidates on the positive branch (f_row > 0 and f_col > 0) must be found almost always;
// that is the check that guards the kernels. With positive-mean scores the negative branch is rare and
// the overall recall is high.
struct RecallCase {
  TdqkrShape s;
  double mean;        // of s_row and s_col
  double floor_all;   // floor on the overall recall
  double floor_pos;   // floor on the recall of true top-m candidates with f_row > 0 and f_col > 0
};

TYPED_TEST(TdqkrKernels, RecallWithSvdFilter) {
  using T = TypeParam;
  const std::vector<RecallCase> cases = {
      {{256, 1, 2, 64, 2, 32, 16}, 0.0, 0.45, 0.99},
      {{256, 2, 2, 64, 2, 16, 16}, 0.0, 0.45, 0.99},
      {{128, 1, 2, 128, 2, 32, 32}, 0.0, 0.45, 0.99},
      {{128, 1, 2, 128, 2, 8, 32}, 0.0, 0.40, 0.85},  // m > m_first: the positive branch loses some too
      {{256, 1, 2, 64, 2, 32, 16}, 0.3, 0.95, 0.99},
      {{256, 1, 2, 64, 2, 16, 16}, 0.5, 0.99, 0.99},
      {{256, 1, 2, 64, 2, 32, 16}, 1.0, 0.99, 0.99},
      {{256, 1, 2, 64, 2, 64, 16}, 0.0, 1.00, 1.00},  // m_first = n: exact
  };
  uint32_t seed = 100;
  for (const auto& rc : cases) {
    const TdqkrShape& s = rc.s;
    SCOPED_TRACE(describe(s) + " mean=" + std::to_string(rc.mean));
    auto p = make_tdqkr<T>(s, seed++);
    for (auto* x : {&p.s_row, &p.s_col})
      for (auto& e : *x) e += T(rc.mean);
    set_svd_filter(p);
    const auto got = run_forward<T>(&uk::tdqkr_forward<T>, p);
    const auto truth = run_bruteforce<T>(p);
    const double rec = recall<T>(s, got.index, truth.index);
    int64_t pos_total = 0, pos_found = 0, negneg = 0;
    for (int64_t th = 0; th < s.T * s.H; ++th) {
      const auto* mine = &got.index[th * s.m];
      for (int64_t k = 0; k < s.m; ++k) {
        const int64_t g = truth.index[th * s.m + k];
        const double fr = filter_score(p, th, false, g / s.n), fc = filter_score(p, th, true, g % s.n);
        if (fr < 0 && fc < 0) ++negneg;
        if (fr > 0 && fc > 0) {
          ++pos_total;
          pos_found += std::find(mine, mine + s.m, g) != mine + s.m;
        }
      }
    }
    const double rec_pos = pos_total ? double(pos_found) / double(pos_total) : 1.0;
    std::printf("recall n=%lld m_first=%lld m=%lld r=%lld C=%lld H=%lld mean=%.1f (%s): %.4f"
                "  [positive-branch recall %.4f, true top-m on the negative branch %.3f]\n",
                (long long)s.n, (long long)s.m_first, (long long)s.m, (long long)s.r, (long long)s.C,
                (long long)s.H, rc.mean, std::is_same_v<T, float> ? "float" : "double", rec, rec_pos,
                double(negneg) / double(s.T * s.H * s.m));
    EXPECT_GE(rec, rc.floor_all);
    EXPECT_GE(rec_pos, rc.floor_pos);
    if (rc.floor_all == 1.0) { EXPECT_TRUE(Identical(got.index, truth.index)); }
  }
}

// The two-sign filter on the zero-mean problems where the paper's filter finds about half: the
// candidates from both ends of each side and the same-sign blocks recover the (-,-) quadrant, with at
// most the paper's rescoring work (m_pos^2 + m_neg^2 <= m_first^2 pairs of the rank-1 filter it is
// compared with).
TYPED_TEST(TdqkrKernels, TwoSignFilterRecall) {
  using T = TypeParam;
  struct Case {
    TdqkrShape paper, two_sign;
    double floor;  // on the two-sign recall
  };
  const std::vector<Case> cases = {
      {{256, 1, 2, 64, 2, 16, 16}, {256, 1, 2, 64, 2, 16, 16, 8}, 0.95},     // same candidates, half the pairs
      {{256, 1, 2, 64, 2, 16, 16}, {256, 1, 2, 64, 2, 22, 16, 11}, 0.98},    // about the same pairs
      {{128, 2, 2, 128, 2, 32, 32}, {128, 2, 2, 128, 2, 32, 32, 16}, 0.97},
      {{128, 1, 4, 128, 2, 32, 32}, {128, 1, 4, 128, 2, 44, 32, 22}, 0.98},  // r = 4
  };
  uint32_t seed = 300;
  for (const auto& c : cases) {
    SCOPED_TRACE(describe(c.two_sign));
    ASSERT_LE(c.two_sign.rescored_pairs(), c.paper.rescored_pairs());
    auto p = make_tdqkr<T>(c.paper, seed++);
    set_svd_filter(p);
    const auto truth = run_bruteforce<T>(p);
    const double paper = recall<T>(c.paper, run_forward<T>(&uk::tdqkr_forward<T>, p).index, truth.index);
    auto q = p;
    q.s = c.two_sign;
    const double two = recall<T>(c.two_sign, run_forward<T>(&uk::tdqkr_forward<T>, q).index, truth.index);
    std::printf("recall n=%lld r=%lld m=%lld: paper filter (m_first %lld) %.4f, two-sign (%lld + %lld) %.4f (%s)\n",
                (long long)c.paper.n, (long long)c.paper.r, (long long)c.paper.m, (long long)c.paper.m_first, paper,
                (long long)c.two_sign.m_pos(), (long long)c.two_sign.m_neg, two,
                std::is_same_v<T, float> ? "float" : "double");
    EXPECT_GE(two, c.floor);
    EXPECT_GE(two, paper + 0.25) << "the two-sign filter should find the (-,-) quadrant the paper's filter misses";
  }
}

// The rank-R filter on the zero-mean problems of TwoSignFilterRecall, at the paper's rescoring work
// (the same m_first, every pair rescored): ranking rows by the norm of their R filter scores reaches the
// (-,-) quadrant too. R = 1 ranks by |f|; R = r keeps the whole core sum.
TYPED_TEST(TdqkrKernels, RankRFilterRecall) {
  using T = TypeParam;
  struct Case {
    TdqkrShape s;  // with filter_rank = R
    double floor;  // on the rank-R recall
  };
  const std::vector<Case> cases = {
      {{256, 1, 2, 64, 2, 16, 16, 0, 2}, 0.9},
      {{256, 1, 2, 64, 2, 16, 16, 0, 1}, 0.9},
      {{128, 2, 2, 128, 2, 32, 32, 0, 2}, 0.9},
      {{128, 1, 4, 128, 2, 32, 32, 0, 4}, 0.8},
  };
  uint32_t seed = 330;
  for (const auto& c : cases) {
    SCOPED_TRACE(describe(c.s));
    TdqkrShape paper_s = c.s;
    paper_s.filter_rank = 0;
    auto p = make_tdqkr<T>(paper_s, seed++);
    set_svd_filter(p);
    const auto truth = run_bruteforce<T>(p);
    const double paper = recall<T>(paper_s, run_forward<T>(&uk::tdqkr_forward<T>, p).index, truth.index);
    auto q = p;
    q.s = c.s;
    set_rank_r_filter(q);
    const auto got = run_forward<T>(&uk::tdqkr_forward<T>, q);
    const auto ref = run_rescore<T>(&uk::tdqkr_rescore_ref<T>, q, run_filter<T>(&uk::tdqkr_filter_ref<T>, q));
    EXPECT_TRUE(Identical(got.index, ref.index)) << "kernel vs references";
    const double rank_r = recall<T>(c.s, got.index, truth.index);
    std::printf("recall n=%lld r=%lld m=%lld m_first=%lld: paper filter %.4f, rank-%lld filter %.4f (%s)\n",
                (long long)c.s.n, (long long)c.s.r, (long long)c.s.m, (long long)c.s.m_first, paper,
                (long long)c.s.filter_rank, rank_r, std::is_same_v<T, float> ? "float" : "double");
    EXPECT_GE(rank_r, c.floor);
    EXPECT_GE(rank_r, paper + 0.2) << "the rank-R filter should find the (-,-) quadrant the paper's filter misses";
  }
}

// Rank-1 cores Core_c = alpha_c u v^T with u, v > 0, and s_row, s_col > 0: the filter scores are
// positive and the summed score factorises as sigma * f_row[i] * f_col[j], so the top-m of the grid
// lies in top-m_first rows x top-m_first cols whenever m_first >= m: recall must be exactly 1.
TYPED_TEST(TdqkrKernels, RankOneCoresPositiveFilterIsExact) {
  using T = TypeParam;
  const std::vector<TdqkrShape> shapes = {{200, 1, 2, 64, 2, 16, 16}, {100, 2, 2, 48, 3, 20, 12},
                                          {100, 1, 3, 40, 1, 8, 8},   {100, 2, 1, 32, 2, 4, 1}};
  uint32_t seed = 110;
  for (const TdqkrShape& s : shapes) {
    SCOPED_TRACE(describe(s));
    auto p = make_tdqkr<T>(s, seed++, Fill::kPositive);
    Rng rng(seed * 7);
    std::uniform_real_distribution<double> alpha(0.5, 1.5);
    for (int64_t c = 0; c < s.C; ++c)
      for (int64_t h = 0; h < s.H; ++h) {
        const double al = alpha(rng);
        for (int64_t a = 0; a < s.r; ++a)
          for (int64_t b = 0; b < s.r; ++b)
            p.cores[((c * s.H + h) * s.r + a) * s.r + b] = T(al * double(p.u[h * s.r + a]) * double(p.v[h * s.r + b]));
      }
    const auto got = run_forward<T>(&uk::tdqkr_forward<T>, p);
    const auto truth = run_bruteforce<T>(p);
    const double rec = recall<T>(s, got.index, truth.index);
    std::printf("recall rank-1 positive n=%lld m_first=%lld m=%lld (%s): %.4f\n", (long long)s.n,
                (long long)s.m_first, (long long)s.m, std::is_same_v<T, float> ? "float" : "double", rec);
    EXPECT_EQ(rec, 1.0);
    // Same candidates ranked by the same computed score: the outputs are identical, not just the sets.
    EXPECT_TRUE(Identical(got.index, truth.index));
    EXPECT_TRUE(Identical(got.scores, truth.scores));
  }
}

// =================================================================================================
// 4. TDQKR backward
// =================================================================================================

TYPED_TEST(TdqkrKernels, BackwardMatchesRef) {
  using T = TypeParam;
  std::vector<TdqkrShape> shapes = tdqkr_shapes();
  shapes.push_back({300, 2, 2, 32, 2, 8, 16});  // several dcores chunks
  shapes.push_back({130, 1, 3, 20, 3, 5, 7});
  uint32_t seed = 120;
  for (const TdqkrShape& s : shapes) {
    SCOPED_TRACE(describe(s));
    const auto p = make_tdqkr<T>(s, seed++);
    const auto fw = run_forward<T>(&uk::tdqkr_forward<T>, p);
    std::vector<T> dscores(fw.scores.size());
    Rng rng(seed * 3);
    fill_normal(dscores, rng);
    const auto want = run_backward<T>(&uk::tdqkr_backward_ref<T>, p, fw.index, dscores);
    // Sum of |terms| of every output element: the reference run on absolute values.
    TdqkrProblem<T> pa = p;
    pa.s_row = abs_of(p.s_row);
    pa.s_col = abs_of(p.s_col);
    pa.cores = abs_of(p.cores);
    const auto mag = run_backward<T>(&uk::tdqkr_backward_ref<T>, pa, fw.index, abs_of(dscores));
    for (const auto& tab : isa_tables<T>()) {
      SCOPED_TRACE(tab.name);
      const auto got = run_backward<T>(tab.k.tdqkr_backward, p, fw.index, dscores);
      EXPECT_TRUE(Near(got.ds_row, want.ds_row, mag.ds_row, Tol<T>::kRel)) << "ds_row";
      EXPECT_TRUE(Near(got.ds_col, want.ds_col, mag.ds_col, Tol<T>::kRel)) << "ds_col";
      EXPECT_TRUE(Near(got.dcores, want.dcores, mag.dcores, Tol<T>::kRel)) << "dcores";
    }
  }
}

// Central differences of L = sum(dscores * scores) for fixed kept indices. Scores are linear in each
// of s_row, s_col and cores separately, so the difference quotient is exact up to rounding.
TEST(TdqkrBackward, FiniteDifferenceDouble) {
  const std::vector<TdqkrShape> shapes = {{3, 2, 2, 8, 2, 4, 5}, {2, 1, 3, 6, 3, 6, 9}, {4, 2, 1, 5, 1, 3, 2}};
  const double eps = 1e-6;
  uint32_t seed = 130;
  for (const TdqkrShape& s : shapes) {
    SCOPED_TRACE(describe(s));
    auto p = make_tdqkr<double>(s, seed++);
    const auto base = run_forward<double>(&uk::tdqkr_forward<double>, p);
    std::vector<double> dscores(base.scores.size());
    Rng rng(seed * 5);
    fill_normal(dscores, rng);
    const auto grad = run_backward<double>(&uk::tdqkr_backward<double>, p, base.index, dscores);

    int checked = 0, skipped = 0;
    // Returns L at the perturbed point, or NaN when the kept index set changed.
    auto loss = [&]() {
      const auto k = run_forward<double>(&uk::tdqkr_forward<double>, p);
      if (k.index != base.index) return std::numeric_limits<double>::quiet_NaN();
      double L = 0;
      for (size_t e = 0; e < k.scores.size(); ++e) L += dscores[e] * k.scores[e];
      return L;
    };
    auto check = [&](std::vector<double>& param, const std::vector<double>& analytic, const char* name) {
      for (size_t e = 0; e < param.size(); ++e) {
        const double x0 = param[e];
        param[e] = x0 + eps;
        const double lp = loss();
        param[e] = x0 - eps;
        const double lm = loss();
        param[e] = x0;
        if (std::isnan(lp) || std::isnan(lm)) {
          ++skipped;
          continue;
        }
        ++checked;
        const double fd = (lp - lm) / (2 * eps);
        EXPECT_NEAR(fd, analytic[e], 1e-6 * (1 + std::abs(analytic[e]))) << name << "[" << e << "]";
      }
    };
    check(p.s_row, grad.ds_row, "ds_row");
    check(p.s_col, grad.ds_col, "ds_col");
    check(p.cores, grad.dcores, "dcores");
    EXPECT_GE(checked, 10 * (skipped + 1)) << "too many perturbations changed the kept set";
  }
}

// =================================================================================================
// 5. Pooled lookup
// =================================================================================================

TYPED_TEST(PoolKernels, ForwardMatchesRefBitwise) {
  using T = TypeParam;
  uint32_t seed = 200;
  for (const PoolShape& s : pool_shapes()) {
    SCOPED_TRACE(describe(s));
    ASSERT_EQ(uk::pool_check_shape(s), nullptr);
    const auto p = make_pool<T>(s, seed++);
    const auto want = run_pool_forward<T>(&uk::pooled_lookup_forward_ref<T>, p);
    for (const auto& tab : isa_tables<T>()) {
      SCOPED_TRACE(tab.name);
      EXPECT_TRUE(Identical(run_pool_forward<T>(tab.k.pooled_lookup_forward, p), want));
    }
    EXPECT_TRUE(Identical(run_pool_forward<T>(&uk::pooled_lookup_forward<T>, p), want)) << "public";
  }
}

// Independent of the reference: the formula of pooled_lookup.h written out here in double.
TYPED_TEST(PoolKernels, ForwardMatchesSpecFormula) {
  using T = TypeParam;
  uint32_t seed = 210;
  for (const PoolShape& s : pool_shapes()) {
    SCOPED_TRACE(describe(s));
    const auto p = make_pool<T>(s, seed++);
    const int64_t Ds = s.Dv / s.C, W = s.E * s.Dv;
    std::vector<double> want(s.T * W, 0.0), mag(s.T * W, 0.0);
    for (int64_t t = 0; t < s.T; ++t)
      for (int64_t k = 0; k < s.K; ++k) {
        const int64_t v = p.perm[p.index[t * s.K + k]], grp = v / s.N, row = v % s.N;
        for (int64_t c = 0; c < s.C; ++c)
          for (int64_t d = 0; d < Ds; ++d) {
            const double term = double(p.scores[(t * s.K + k) * s.C + c]) * double(p.values[row * s.Dv + c * Ds + d]);
            want[t * W + grp * s.Dv + c * Ds + d] += term;
            mag[t * W + grp * s.Dv + c * Ds + d] += std::abs(term);
          }
      }
    const auto got = run_pool_forward<T>(&uk::pooled_lookup_forward<T>, p);
    for (size_t e = 0; e < got.size(); ++e)
      ASSERT_NEAR(double(got[e]), want[e], 4 * Tol<T>::kRel * mag[e]) << "element " << e;
  }
}

// The kernel's dot product uses 8 fixed partial sums, the reference a single running sum: equal up
// to rounding only (bitwise equal when Ds <= 3).
TYPED_TEST(PoolKernels, BackwardScoresMatchesRef) {
  using T = TypeParam;
  uint32_t seed = 220;
  for (const PoolShape& s : pool_shapes()) {
    SCOPED_TRACE(describe(s));
    const auto p = make_pool<T>(s, seed++);
    const auto want = run_pool_dscores<T>(&uk::pooled_lookup_backward_scores_ref<T>, p);
    PoolProblem<T> pa = p;
    pa.values = abs_of(p.values);
    pa.dout = abs_of(p.dout);
    const auto mag = run_pool_dscores<T>(&uk::pooled_lookup_backward_scores_ref<T>, pa);
    for (const auto& tab : isa_tables<T>()) {
      SCOPED_TRACE(tab.name);
      const auto got = run_pool_dscores<T>(tab.k.pooled_lookup_backward_scores, p);
      EXPECT_TRUE(Near(got, want, mag, Tol<T>::kRel));
      if (s.Dv / s.C <= 3) { EXPECT_TRUE(Identical(got, want)) << "Ds <= 3 has no reassociation"; }
    }
  }
}

// Row-sparse value gradient scattered to [N, Dv] vs the dense reference: same per-row summation
// order (hits ascending), so bit-identical.
TYPED_TEST(PoolKernels, BackwardValuesMatchesDenseRef) {
  using T = TypeParam;
  uint32_t seed = 230;
  for (const PoolShape& s : pool_shapes()) {
    SCOPED_TRACE(describe(s));
    const auto p = make_pool<T>(s, seed++);
    std::vector<T> want(s.N * s.Dv, kNaN<T>);
    uk::pooled_lookup_backward_values_dense_ref(s, p.index.data(), p.scores.data(), p.perm.data(), p.dout.data(),
                                                want.data());
    RowGroups g;
    uk::group_hits_by_row(s, p.index.data(), p.perm.data(), g);
    ASSERT_TRUE(RowGroupsValid(s, p.index.data(), p.perm.data(), g));
    for (const auto& tab : isa_tables<T>()) {
      SCOPED_TRACE(tab.name);
      EXPECT_TRUE(Identical(run_pool_dvalues_dense<T>(tab.k.pooled_lookup_backward_values, p), want));
    }
    EXPECT_TRUE(Identical(run_pool_dvalues_dense<T>(&uk::pooled_lookup_backward_values<T>, p), want)) << "public";
  }
}

TEST(PoolGroups, RowGroupsInvariants) {
  uint32_t seed = 240;
  // Includes N around the 11-bit radix digit boundaries and one N needing three radix passes.
  std::vector<PoolShape> shapes = pool_shapes();
  for (int64_t N : {1, 2, 2047, 2048, 2049, 5000, 70000})
    for (int64_t E : {1, 4}) shapes.push_back({40, 50, N, 4, E, 1});
  for (const PoolShape& s : shapes) {
    SCOPED_TRACE(describe(s));
    const auto p = make_pool<float>(s, seed++);
    RowGroups g;
    g.rows = {123};  // stale content must be replaced
    g.offsets = {9, 9};
    uk::group_hits_by_row(s, p.index.data(), p.perm.data(), g);
    EXPECT_TRUE(RowGroupsValid(s, p.index.data(), p.perm.data(), g));
    // Every distinct row that is hit appears.
    std::vector<int64_t> rows;
    for (int64_t e = 0; e < s.T * s.K; ++e) rows.push_back(p.perm[p.index[e]] % s.N);
    std::sort(rows.begin(), rows.end());
    rows.erase(std::unique(rows.begin(), rows.end()), rows.end());
    EXPECT_EQ(rows, g.rows);
  }
  // N > 2^22: rows span three 11-bit digits. An affine permutation keeps the setup cheap.
  const PoolShape big{64, 40, (int64_t(1) << 22) + 3, 4, 1, 1};
  std::vector<int64_t> perm(big.E * big.N);
  const int64_t a = 1000003, b = 12345;
  ASSERT_EQ(std::gcd(a, big.E * big.N), 1);
  for (int64_t x = 0; x < big.E * big.N; ++x) perm[x] = (a * x + b) % (big.E * big.N);
  Rng rng(seed);
  std::uniform_int_distribution<int64_t> gi(0, big.E * big.N - 1);
  std::vector<int64_t> index(big.T * big.K);
  for (auto& e : index) e = gi(rng);
  index[5] = index[700];  // a repeated hit
  RowGroups g;
  uk::group_hits_by_row(big, index.data(), perm.data(), g);
  EXPECT_TRUE(RowGroupsValid(big, index.data(), perm.data(), g)) << describe(big);
}

// Finite differences in double of L = sum(dout * out) w.r.t. values and scores (L is linear in each).
TEST(PoolBackward, FiniteDifferenceDouble) {
  const std::vector<PoolShape> shapes = {{5, 7, 6, 8, 4, 2}, {4, 6, 3, 12, 9, 4}, {3, 9, 2, 6, 1, 1}};
  const double eps = 1e-6;
  uint32_t seed = 250;
  for (const PoolShape& s : shapes) {
    SCOPED_TRACE(describe(s));
    auto p = make_pool<double>(s, seed++);
    const auto dscores = run_pool_dscores<double>(&uk::pooled_lookup_backward_scores<double>, p);
    const auto dvalues = run_pool_dvalues_dense<double>(&uk::pooled_lookup_backward_values<double>, p);
    auto loss = [&]() {
      const auto out = run_pool_forward<double>(&uk::pooled_lookup_forward<double>, p);
      double L = 0;
      for (size_t e = 0; e < out.size(); ++e) L += p.dout[e] * out[e];
      return L;
    };
    auto check = [&](std::vector<double>& param, const std::vector<double>& analytic, const char* name) {
      for (size_t e = 0; e < param.size(); ++e) {
        const double x0 = param[e];
        param[e] = x0 + eps;
        const double lp = loss();
        param[e] = x0 - eps;
        const double lm = loss();
        param[e] = x0;
        EXPECT_NEAR((lp - lm) / (2 * eps), analytic[e], 1e-6 * (1 + std::abs(analytic[e]))) << name << "[" << e << "]";
      }
    };
    check(p.values, dvalues, "dvalues");
    check(p.scores, dscores, "dscores");
  }
}

// =================================================================================================
// 6. Determinism across OpenMP thread counts
// =================================================================================================

// Results with 2 and 3 threads are bitwise those with 1 thread, which in turn match the references
// (bitwise, or within rounding where the association order differs by design).
TYPED_TEST(Determinism, TdqkrIndependentOfThreadCount) {
  using T = TypeParam;
  const std::vector<TdqkrShape> shapes = {
      {300, 2, 2, 32, 2, 8, 16},  // 5 dcores chunks of 64 tokens
      {257, 1, 3, 24, 3, 6, 9},   // last chunk of 1 token
      {64, 2, 2, 20, 2, 5, 25},   // exactly one chunk, m = m_first^2
      {7, 2, 9, 19, 2, 4, 7},     // r*r > 64
      {0, 2, 2, 16, 2, 4, 8}};    // T = 0
  uint32_t seed = 300;
  for (const TdqkrShape& s : shapes) {
    SCOPED_TRACE(describe(s));
    const auto p = make_tdqkr<T>(s, seed++);
    std::vector<T> dscores(s.T * s.H * s.m * s.C);
    Rng rng(seed);
    fill_normal(dscores, rng);
    const auto ref = run_rescore<T>(&uk::tdqkr_rescore_ref<T>, p, run_filter<T>(&uk::tdqkr_filter_ref<T>, p));
    const auto ref_g = run_backward<T>(&uk::tdqkr_backward_ref<T>, p, ref.index, dscores);
    TdqkrProblem<T> pa = p;
    pa.s_row = abs_of(p.s_row);
    pa.s_col = abs_of(p.s_col);
    pa.cores = abs_of(p.cores);
    const auto mag = run_backward<T>(&uk::tdqkr_backward_ref<T>, pa, ref.index, abs_of(dscores));
    for (const auto& tab : isa_tables<T>()) {
      SCOPED_TRACE(tab.name);
      Kept<T> k1;
      Filtered<T> f1;
      TdqkrGrads<T> g1;
      {
        OmpThreads one(1);
        f1 = run_filter<T>(tab.k.tdqkr_filter, p);
        k1 = run_forward<T>(tab.k.tdqkr_forward, p);
        g1 = run_backward<T>(tab.k.tdqkr_backward, p, k1.index, dscores);
      }
      EXPECT_TRUE(Identical(k1.index, ref.index));
      EXPECT_TRUE(Identical(k1.scores, ref.scores));
      EXPECT_TRUE(Near(g1.dcores, ref_g.dcores, mag.dcores, Tol<T>::kRel));
      EXPECT_TRUE(Near(g1.ds_row, ref_g.ds_row, mag.ds_row, Tol<T>::kRel));
      EXPECT_TRUE(Near(g1.ds_col, ref_g.ds_col, mag.ds_col, Tol<T>::kRel));
      for (int threads : {2, 3}) {
        SCOPED_TRACE("threads=" + std::to_string(threads));
        OmpThreads many(threads);
        ASSERT_EQ(team_size(), threads) << "OpenMP did not give the requested team; the test would prove nothing";
        const auto f = run_filter<T>(tab.k.tdqkr_filter, p);
        const auto k = run_forward<T>(tab.k.tdqkr_forward, p);
        const auto r = run_rescore<T>(tab.k.tdqkr_rescore, p, f);
        const auto g = run_backward<T>(tab.k.tdqkr_backward, p, k1.index, dscores);
        EXPECT_TRUE(Identical(f.row, f1.row));
        EXPECT_TRUE(Identical(f.col, f1.col));
        EXPECT_TRUE(Identical(k.index, k1.index));
        EXPECT_TRUE(Identical(k.scores, k1.scores));
        EXPECT_TRUE(Identical(r.index, k1.index));
        EXPECT_TRUE(Identical(r.scores, k1.scores));
        EXPECT_TRUE(Identical(g.ds_row, g1.ds_row)) << "ds_row";
        EXPECT_TRUE(Identical(g.ds_col, g1.ds_col)) << "ds_col";
        EXPECT_TRUE(Identical(g.dcores, g1.dcores)) << "dcores";
      }
    }
  }
}

TYPED_TEST(Determinism, PoolIndependentOfThreadCount) {
  using T = TypeParam;
  const std::vector<PoolShape> shapes = {
      {300, 32, 500, 16, 4, 2},  // U well above the dynamic chunk (64 rows) of the value gradient
      {200, 24, 7, 12, 9, 4},    // heavy row reuse
      {5, 9, 30, 104, 9, 4},     // Ds = 26: dot with 8-lane blocks and a tail
      {0, 8, 10, 8, 4, 2},       // T = 0
      {6, 0, 10, 8, 4, 2}};      // K = 0
  uint32_t seed = 310;
  for (const PoolShape& s : shapes) {
    SCOPED_TRACE(describe(s));
    const auto p = make_pool<T>(s, seed++);
    RowGroups g;
    uk::group_hits_by_row(s, p.index.data(), p.perm.data(), g);
    const auto ref_out = run_pool_forward<T>(&uk::pooled_lookup_forward_ref<T>, p);
    std::vector<T> ref_dv(s.N * s.Dv);
    uk::pooled_lookup_backward_values_dense_ref(s, p.index.data(), p.scores.data(), p.perm.data(), p.dout.data(),
                                                ref_dv.data());
    for (const auto& tab : isa_tables<T>()) {
      SCOPED_TRACE(tab.name);
      std::vector<T> out1, ds1, dv1;
      {
        OmpThreads one(1);
        out1 = run_pool_forward<T>(tab.k.pooled_lookup_forward, p);
        ds1 = run_pool_dscores<T>(tab.k.pooled_lookup_backward_scores, p);
        dv1 = run_pool_dvalues_rows<T>(tab.k.pooled_lookup_backward_values, p, g);
      }
      EXPECT_TRUE(Identical(out1, ref_out));
      EXPECT_TRUE(Identical(run_pool_dvalues_dense<T>(tab.k.pooled_lookup_backward_values, p), ref_dv));
      for (int threads : {2, 3}) {
        SCOPED_TRACE("threads=" + std::to_string(threads));
        OmpThreads many(threads);
        ASSERT_EQ(team_size(), threads) << "OpenMP did not give the requested team; the test would prove nothing";
        EXPECT_TRUE(Identical(run_pool_forward<T>(tab.k.pooled_lookup_forward, p), out1)) << "forward";
        EXPECT_TRUE(Identical(run_pool_dscores<T>(tab.k.pooled_lookup_backward_scores, p), ds1)) << "dscores";
        EXPECT_TRUE(Identical(run_pool_dvalues_rows<T>(tab.k.pooled_lookup_backward_values, p, g), dv1)) << "dvalues";
      }
    }
  }
}

TEST(DeterminismGuard, ThreadCountRestored) {
  const int before = omp_get_max_threads();
  {
    OmpThreads two(2);
    EXPECT_EQ(omp_get_max_threads(), 2);
    EXPECT_EQ(team_size(), 2);
  }
  EXPECT_EQ(omp_get_max_threads(), before);
}

// =================================================================================================
// 7. Generic and AVX2 builds agree bitwise
// =================================================================================================

TYPED_TEST(IsaAgreement, AllKernelsBitwiseEqual) {
  using T = TypeParam;
  const auto tabs = isa_tables<T>();
  if (tabs.size() < 2) GTEST_SKIP() << "CPU lacks AVX2/FMA: only the generic build can run";
  const KernelTable<T>& g = tabs[0].k;
  const KernelTable<T>& a = tabs[1].k;
  uint32_t seed = 400;
  for (const TdqkrShape& s : tdqkr_shapes()) {
    SCOPED_TRACE(describe(s));
    const auto p = make_tdqkr<T>(s, seed++);
    const auto fg = run_filter<T>(g.tdqkr_filter, p), fa = run_filter<T>(a.tdqkr_filter, p);
    EXPECT_TRUE(Identical(fa.row, fg.row));
    EXPECT_TRUE(Identical(fa.col, fg.col));
    const auto rg = run_rescore<T>(g.tdqkr_rescore, p, fg), ra = run_rescore<T>(a.tdqkr_rescore, p, fg);
    EXPECT_TRUE(Identical(ra.index, rg.index));
    EXPECT_TRUE(Identical(ra.scores, rg.scores));
    const auto kg = run_forward<T>(g.tdqkr_forward, p), ka = run_forward<T>(a.tdqkr_forward, p);
    EXPECT_TRUE(Identical(ka.index, kg.index));
    EXPECT_TRUE(Identical(ka.scores, kg.scores));
    std::vector<T> dscores(kg.scores.size());
    Rng rng(seed);
    fill_normal(dscores, rng);
    const auto bg = run_backward<T>(g.tdqkr_backward, p, kg.index, dscores);
    const auto ba = run_backward<T>(a.tdqkr_backward, p, kg.index, dscores);
    EXPECT_TRUE(Identical(ba.ds_row, bg.ds_row));
    EXPECT_TRUE(Identical(ba.ds_col, bg.ds_col));
    EXPECT_TRUE(Identical(ba.dcores, bg.dcores));
  }
  for (const PoolShape& s : pool_shapes()) {
    SCOPED_TRACE(describe(s));
    const auto p = make_pool<T>(s, seed++);
    EXPECT_TRUE(Identical(run_pool_forward<T>(a.pooled_lookup_forward, p), run_pool_forward<T>(g.pooled_lookup_forward, p)));
    EXPECT_TRUE(Identical(run_pool_dscores<T>(a.pooled_lookup_backward_scores, p),
                          run_pool_dscores<T>(g.pooled_lookup_backward_scores, p)));
    EXPECT_TRUE(Identical(run_pool_dvalues_dense<T>(a.pooled_lookup_backward_values, p),
                          run_pool_dvalues_dense<T>(g.pooled_lookup_backward_values, p)));
  }
}

// The public entry points use the AVX2 build exactly when the CPU supports it (unless forced off).
TEST(IsaDispatch, ActiveIsaMatchesCpu) {
  const char* force = std::getenv("ULTRAMEM_ISA");
  const bool forced_generic = force && std::string(force) == "generic";
  const std::string isa = uk::active_isa();
#if defined(__x86_64__)
  EXPECT_EQ(isa, (ultramem::kernels::cpu_has_avx2_fma() && !forced_generic) ? "avx2" : "generic");
#else
  EXPECT_EQ(isa, "generic");
#endif
}

// =================================================================================================
// 8. Shape validation
// =================================================================================================

bool is_ident_char(char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; }
// Whether msg mentions `field` as a whole identifier ("m" does not match inside "m_first").
bool mentions(const char* msg, const std::string& field) {
  const std::string m(msg);
  for (size_t pos = m.find(field); pos != std::string::npos; pos = m.find(field, pos + 1)) {
    const bool left = pos == 0 || !is_ident_char(m[pos - 1]);
    const bool right = pos + field.size() == m.size() || !is_ident_char(m[pos + field.size()]);
    if (left && right) return true;
  }
  return false;
}

TEST(ShapeCheck, Tdqkr) {
  const TdqkrShape ok{4, 2, 2, 16, 2, 8, 16};
  const std::vector<TdqkrShape> valid = {ok, {0, 2, 2, 16, 2, 8, 16}, {1, 1, 1, 1, 1, 1, 1},
                                         {3, 2, 2, 16, 2, 16, 256}, {3, 2, 9, 5, 4, 2, 4}};
  for (const auto& s : valid) EXPECT_EQ(uk::tdqkr_check_shape(s), nullptr) << describe(s);
  struct Bad {
    TdqkrShape s;
    std::string field;
  };
  auto with = [&](auto f) {
    TdqkrShape s = ok;
    f(s);
    return s;
  };
  const std::vector<Bad> invalid = {
      {with([](TdqkrShape& s) { s.m_first = 17; }), "m_first"},                // m_first > n
      {with([](TdqkrShape& s) { s.m_first = 0; }), "m_first"},
      {with([](TdqkrShape& s) { s.m_first = -3; }), "m_first"},
      {with([](TdqkrShape& s) { s.m = 65; }), "m"},                            // m > m_first^2
      {with([](TdqkrShape& s) { s.m = 0; }), "m"},
      {with([](TdqkrShape& s) { s.n = 0; s.m_first = 0; s.m = 0; }), "n"},
      {with([](TdqkrShape& s) { s.H = 0; }), "H"},
      {with([](TdqkrShape& s) { s.r = 0; }), "r"},
      {with([](TdqkrShape& s) { s.C = 0; }), "C"},
      {with([](TdqkrShape& s) { s.T = -1; }), "T"},
  };
  for (const auto& b : invalid) {
    SCOPED_TRACE(describe(b.s));
    const char* msg = uk::tdqkr_check_shape(b.s);
    ASSERT_NE(msg, nullptr) << "invalid shape accepted";
    EXPECT_TRUE(mentions(msg, b.field)) << "message \"" << msg << "\" does not name " << b.field;
  }
}

TEST(ShapeCheck, Pool) {
  const PoolShape ok{4, 8, 10, 16, 4, 2};
  const std::vector<PoolShape> valid = {ok, {0, 8, 10, 16, 4, 2}, {4, 0, 10, 16, 4, 2}, {1, 1, 1, 1, 1, 1},
                                        {2, 3, 5, 12, 9, 4}};
  for (const auto& s : valid) EXPECT_EQ(uk::pool_check_shape(s), nullptr) << describe(s);
  struct Bad {
    PoolShape s;
    std::vector<std::string> fields;  // all must be named
  };
  auto with = [&](auto f) {
    PoolShape s = ok;
    f(s);
    return s;
  };
  const std::vector<Bad> invalid = {
      {with([](PoolShape& s) { s.N = 0; }), {"N"}},
      {with([](PoolShape& s) { s.E = 0; }), {"E"}},
      {with([](PoolShape& s) { s.C = 0; }), {"C"}},
      {with([](PoolShape& s) { s.Dv = 0; }), {"Dv"}},
      {with([](PoolShape& s) { s.Dv = 10; s.C = 4; }), {"Dv", "C"}},  // Dv % C != 0
      {with([](PoolShape& s) { s.T = -1; }), {"T"}},
      {with([](PoolShape& s) { s.K = -2; }), {"K"}},
  };
  for (const auto& b : invalid) {
    SCOPED_TRACE(describe(b.s));
    const char* msg = uk::pool_check_shape(b.s);
    ASSERT_NE(msg, nullptr) << "invalid shape accepted";
    for (const auto& f : b.fields) EXPECT_TRUE(mentions(msg, f)) << "message \"" << msg << "\" does not name " << f;
  }
}

// ---------------------------------------------------------------------------------------------------
// The keyed Feistel permutation (issue 17: an IVE permutation that takes no memory).

TEST(FeistelPermutation, IsABijectionAtEverySizeExhaustively) {
  for (uint64_t size : {1ull, 2ull, 3ull, 5ull, 64ull, 1000ull, 4099ull, 65536ull, 100003ull, 262147ull}) {
    for (uint64_t key : {0ull, 1ull, 0xDEADBEEFull}) {
      const FeistelPermutation f(size, key);
      std::vector<uint8_t> hit(size, 0);
      for (uint64_t x = 0; x < size; ++x) {
        const uint64_t y = f.forward(x);
        ASSERT_LT(y, size) << "size " << size << " key " << key << " x " << x;
        ASSERT_EQ(hit[y], 0) << "size " << size << " key " << key << ": " << y << " hit twice";
        hit[y] = 1;
        ASSERT_EQ(f.inverse(y), x) << "size " << size << " key " << key;
      }
    }
  }
}

TEST(FeistelPermutation, LargeSizesInverseKeysAndSpread) {
  // 2^30 * 4 virtual slots (the tiered benchmark's 2^28 rows, E = 4) and an odd size beyond 2^32: the
  // inverse undoes every sampled image, which stays inside the domain.
  std::mt19937_64 gen(3);
  for (uint64_t size : {uint64_t(1) << 30, (uint64_t(1) << 32) + 7, (uint64_t(1) << 40) - 3}) {
    const FeistelPermutation f(size, 42);
    for (int i = 0; i < 20000; ++i) {
      const uint64_t x = gen() % size, y = f.forward(x);
      ASSERT_LT(y, size);
      ASSERT_EQ(f.inverse(y), x) << size;
    }
  }
  // Another key is another permutation; the same key the same one.
  const FeistelPermutation a(1 << 20, 7), b(1 << 20, 8), a2(1 << 20, 7);
  int same = 0;
  for (uint64_t x = 0; x < 4096; ++x) {
    same += a.forward(x) == b.forward(x);
    ASSERT_EQ(a.forward(x), a2.forward(x));
  }
  EXPECT_LT(same, 8);
  // Neighbouring slots land far apart (the permutation spreads a grid row over the table): of 4096
  // consecutive inputs' images, the mean distance between neighbours is near size / 3, as for a random
  // permutation, and few are fixed points.
  const uint64_t size = 1 << 20;
  double mean_gap = 0;
  int fixed = 0;
  for (uint64_t x = 0; x < 4096; ++x) {
    const double d = double(a.forward(x + 1)) - double(a.forward(x));
    mean_gap += std::fabs(d) / 4096;
    fixed += a.forward(x) == x;
  }
  EXPECT_GT(mean_gap, double(size) / 3 * 0.8);
  EXPECT_LT(mean_gap, double(size) / 3 * 1.2);
  EXPECT_LT(fixed, 4);
}

}  // namespace
