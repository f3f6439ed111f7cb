// Torch-free tests of the inference kernels: bf16 / int8 value quantisation (rounding, error bounds,
// special values), the few-row matrix products and gathered dots of the decode path (bitwise equal to
// their references in every ISA build), the one-pass top-k selection (equal to a full sort, ties and
// NaNs included), and the pooled lookup over bf16 and int8 value tables:
//   * every ISA build bit-identical to the scalar reference, and the public entry points too,
//   * bf16 bit-identical to the float32 kernel on the widened table (widening is exact),
//   * int8 equal to the float32 kernel on the dequantised table up to rounding,
//   * independent of the OpenMP thread count, including token ranges that span several chunks.
// Every check asserts. All randomness is seeded.
#include <gtest/gtest.h>
#include <omp.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "ultramem/kernels/cpu_features.h"
#include "ultramem/kernels/feistel.h"
#include "ultramem/kernels/huge_pages.h"
#include "ultramem/kernels/kernel_table.h"
#include "ultramem/kernels/pooled_lookup.h"
#include "ultramem/kernels/row_cache.h"
#include "ultramem/kernels/small_matmul.h"
#include "ultramem/kernels/topk.h"
#include "ultramem/kernels/value_quant.h"
#include "ultramem/kernels/value_table_file.h"

namespace {

namespace uk = ultramem::kernels;
using uk::KernelTable;
using uk::PoolShape;
using Rng = std::mt19937;

template <typename T>
bool same_bits(T a, T b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

template <typename T>
::testing::AssertionResult Identical(const std::vector<T>& got, const std::vector<T>& want) {
  if (got.size() != want.size()) return ::testing::AssertionFailure() << "size " << got.size() << " vs " << want.size();
  for (size_t i = 0; i < got.size(); ++i)
    if (!same_bits(got[i], want[i]))
      return ::testing::AssertionFailure() << "element " << i << ": got " << got[i] << ", expected " << want[i];
  return ::testing::AssertionSuccess();
}

float bits_to_float(uint32_t b) {
  float x;
  std::memcpy(&x, &b, 4);
  return x;
}

class OmpThreads {
 public:
  explicit OmpThreads(int n) : saved_(omp_get_max_threads()) { omp_set_num_threads(n); }
  ~OmpThreads() { omp_set_num_threads(saved_); }

 private:
  int saved_;
};

template <typename T>
std::vector<std::pair<std::string, KernelTable<T>>> isa_tables() {
  std::vector<std::pair<std::string, KernelTable<T>>> v;
  KernelTable<T> g{};
  uk::generic::fill_pool(g);
  uk::generic::fill_small_matmul(g);
  v.emplace_back("generic", g);
#if defined(__x86_64__)
  if (ultramem::kernels::cpu_has_avx2_fma()) {
    KernelTable<T> a{};
    uk::avx2::fill_pool(a);
    uk::avx2::fill_small_matmul(a);
    v.emplace_back("avx2", a);
  }
#endif
  return v;
}

// =================================================================================================
// Quantisation
// =================================================================================================

TEST(Bf16, RoundsToNearestEven) {
  // 1 + 2^-8 lies exactly between bf16 neighbours 1 and 1 + 2^-7: ties go to the even mantissa (1).
  EXPECT_EQ(uk::float_to_bf16(bits_to_float(0x3f808000u)), 0x3f80u);
  // 1 + 3*2^-8 lies between 1 + 2^-7 (odd) and 1 + 2^-6 (even): goes up to the even one.
  EXPECT_EQ(uk::float_to_bf16(bits_to_float(0x3f818000u)), 0x3f82u);
  // Just above / below the tie.
  EXPECT_EQ(uk::float_to_bf16(bits_to_float(0x3f808001u)), 0x3f81u);
  EXPECT_EQ(uk::float_to_bf16(bits_to_float(0x3f807fffu)), 0x3f80u);
  EXPECT_EQ(uk::float_to_bf16(-2.0f), 0xc000u);
  EXPECT_EQ(uk::float_to_bf16(0.0f), 0x0000u);
  EXPECT_EQ(uk::float_to_bf16(-0.0f), 0x8000u);
}

TEST(Bf16, SpecialValues) {
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(uk::float_to_bf16(inf), 0x7f80u);
  EXPECT_EQ(uk::float_to_bf16(-inf), 0xff80u);
  EXPECT_TRUE(std::isnan(uk::bf16_to_float(uk::float_to_bf16(std::numeric_limits<float>::quiet_NaN()))));
  // A NaN whose payload sits only in the low 16 bits must not turn into infinity.
  EXPECT_TRUE(std::isnan(uk::bf16_to_float(uk::float_to_bf16(bits_to_float(0x7f800001u)))));
  // The largest float rounds up to infinity (as IEEE rounding to nearest does).
  EXPECT_EQ(uk::float_to_bf16(std::numeric_limits<float>::max()), 0x7f80u);
}

TEST(Bf16, RoundTripErrorBoundAndExactWidening) {
  Rng rng(1);
  std::vector<float> x(1 << 16);
  std::normal_distribution<float> d(0.0f, 3.0f);
  for (auto& v : x) v = d(rng) * std::pow(2.0f, float(int(rng() % 40) - 20));
  std::vector<uint16_t> q(x.size());
  uk::quantize_bf16(x.data(), int64_t(x.size()), q.data());
  std::vector<float> back(x.size());
  uk::dequantize_bf16(q.data(), int64_t(q.size()), back.data());
  for (size_t i = 0; i < x.size(); ++i) {
    ASSERT_EQ(q[i], uk::float_to_bf16(x[i])) << i;
    ASSERT_TRUE(same_bits(back[i], uk::bf16_to_float(q[i]))) << i;
    ASSERT_LE(std::abs(double(back[i]) - double(x[i])), std::ldexp(std::abs(double(x[i])), -8)) << x[i];
    uint32_t b;
    std::memcpy(&b, &back[i], 4);
    ASSERT_EQ(b & 0xffffu, 0u) << "the widened value has low bits set";
  }
  // Values already representable in bf16 are unchanged.
  for (uint32_t h : {0x3f80u, 0x4049u, 0xbf00u, 0x0001u, 0x7f7fu}) {
    const float v = uk::bf16_to_float(uint16_t(h));
    EXPECT_EQ(uk::float_to_bf16(v), h);
  }
}

TEST(Int8, ScaleIsMaxAbsOver127AndErrorWithinHalfAStep) {
  Rng rng(2);
  const int64_t rows = 300, cols = 77;
  std::vector<float> x(rows * cols);
  std::normal_distribution<float> d(0.0f, 1.0f);
  for (int64_t r = 0; r < rows; ++r) {
    const float mag = std::pow(10.0f, float(int(r % 9) - 4));  // rows of very different magnitudes
    for (int64_t c = 0; c < cols; ++c) x[r * cols + c] = d(rng) * mag;
  }
  std::vector<int8_t> q(x.size());
  std::vector<float> scale(rows), back(x.size());
  ASSERT_EQ(uk::quantize_int8_rows(x.data(), rows, cols, q.data(), scale.data()), -1);
  uk::dequantize_int8_rows(q.data(), scale.data(), rows, cols, back.data());
  for (int64_t r = 0; r < rows; ++r) {
    float amax = 0;
    for (int64_t c = 0; c < cols; ++c) amax = std::max(amax, std::abs(x[r * cols + c]));
    ASSERT_EQ(scale[r], amax / 127.0f) << "row " << r;
    bool has_extreme = false;
    for (int64_t c = 0; c < cols; ++c) {
      const int8_t v = q[r * cols + c];
      ASSERT_GE(v, -127);
      ASSERT_LE(v, 127);
      has_extreme = has_extreme || v == 127 || v == -127;
      ASSERT_EQ(back[r * cols + c], float(v) * scale[r]);
      // Half a quantisation step, plus float rounding of x / scale and of q * scale.
      ASSERT_LE(std::abs(double(back[r * cols + c]) - double(x[r * cols + c])), 0.5 * scale[r] * (1 + 1e-5))
          << "row " << r << " col " << c;
    }
    EXPECT_TRUE(has_extreme) << "the largest |value| of row " << r << " must map to +-127";
  }
}

TEST(Int8, ZeroRowsAndNonFiniteRows) {
  const int64_t cols = 5;
  std::vector<float> x = {0, 0, 0, 0, 0,  1, -2, 0.5f, 0, 0,  0, 0, 0, 0, 0};
  std::vector<int8_t> q(x.size(), 99);
  std::vector<float> scale(3, -1);
  ASSERT_EQ(uk::quantize_int8_rows(x.data(), 3, cols, q.data(), scale.data()), -1);
  EXPECT_EQ(scale[0], 0.0f);
  EXPECT_EQ(scale[2], 0.0f);
  for (int64_t c = 0; c < cols; ++c) {
    EXPECT_EQ(q[c], 0);
    EXPECT_EQ(q[2 * cols + c], 0);
  }
  EXPECT_EQ(q[cols + 1], -127);
  EXPECT_EQ(q[cols + 0], int8_t(std::round(1.0f / scale[1])));
  x[2 * cols + 3] = std::numeric_limits<float>::infinity();
  x[cols + 1] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_EQ(uk::quantize_int8_rows(x.data(), 3, cols, q.data(), scale.data()), 1) << "first bad row";
}

TEST(HugePages, AlignedWritableAndFreed) {
  const size_t bytes = (size_t(5) << 20) + 123;
  auto* p = static_cast<unsigned char*>(uk::alloc_huge_pages(bytes));
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % (uintptr_t(2) << 20), 0u);
  p[0] = 1;
  p[bytes - 1] = 2;
  EXPECT_EQ(p[0] + p[bytes - 1], 3);
  uk::free_huge_pages(p);
  EXPECT_EQ(uk::alloc_huge_pages(0), nullptr);
  uk::free_huge_pages(nullptr);
}

// =================================================================================================
// Top-k selection and few-row products
// =================================================================================================

// select_top (a one-pass scan when n >= 8k, else nth_element + sort) keeps exactly the first k of a
// full sort under the ranking order, with many ties and NaNs.
TEST(SelectTop, EqualsFullSort) {
  Rng rng(11);
  std::normal_distribution<float> d(0.0f, 1.0f);
  for (int64_t n : {1, 5, 31, 64, 256, 257, 1024, 4096})
    for (int64_t k : {1, 3, 32, 64, 100}) {
      std::vector<uk::Ranked<float>> c(n);
      for (int64_t i = 0; i < n; ++i) {
        float x = std::round(d(rng) * 4) / 4;  // many exact ties
        if (rng() % 17 == 0) x = std::numeric_limits<float>::quiet_NaN();
        c[i] = {x, (i * 7919) % n, i};         // ids unique, not in scan order
      }
      if (n % 7 != 1)
        for (int64_t i = 0; i < n; ++i) std::swap(c[i], c[rng() % n]);
      auto want = c;
      std::sort(want.begin(), want.end(), uk::ranks_before<float>);
      uk::select_top(c, k);
      for (int64_t x = 0; x < std::min(k, n); ++x)
        ASSERT_EQ(c[x].id, want[x].id) << "n=" << n << " k=" << k << " position " << x;
    }
}

// scan_top (TDQKR's selection: threshold pre-filter, then the full comparison) over raw scores with
// ids not in scan order equals the first k of a full sort. (This file builds the portable version;
// the AVX2 one is compared with the references by test_kernels' TDQKR tests in the avx2 build.)
TEST(SelectTop, ScanTopEqualsFullSort) {
  Rng rng(14);
  std::normal_distribution<float> d(0.0f, 1.0f);
  for (int64_t n : {8, 33, 512, 1024, 4096})
    for (int64_t k : {1, 8, 32, 64}) {
      if (k > n) continue;
      std::vector<float> score(n);
      for (auto& x : score) {
        x = std::round(d(rng) * 4) / 4;
        if (rng() % 13 == 0) x = std::numeric_limits<float>::quiet_NaN();
      }
      auto id_of = [n](int64_t i) { return (i * 7919 + 3) % n; };
      std::vector<uk::Ranked<float>> want(n);
      for (int64_t i = 0; i < n; ++i) want[i] = {score[i], id_of(i), i};
      std::sort(want.begin(), want.end(), uk::ranks_before<float>);
      uk::TopBuffer<float> buf(k);
      uk::scan_top(score.data(), n, buf, id_of);
      for (int64_t x = 0; x < k; ++x) {
        ASSERT_EQ(buf.best[x].id, want[x].id) << "n=" << n << " k=" << k << " position " << x;
        ASSERT_EQ(buf.best[x].pos, want[x].pos);
      }
    }
}

// select_top_k (group-maxima threshold, survivors, exact selection) equals the first k of a full sort,
// with ties, NaN, -inf and +inf scores, nearly all NaN (the fallback), and positions offset by pos0.
TEST(SelectTop, SelectTopKEqualsFullSort) {
  Rng rng(15);
  std::normal_distribution<float> d(0.0f, 1.0f);
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  int cases = 0;
  for (int64_t n : {8, 64, 256, 1000, 1024, 4096})
    for (int64_t k : {1, 8, 32, 64})
      for (int variant = 0; variant < 5; ++variant) {
        if (k > n) continue;
        std::vector<float> score(n);
        for (auto& x : score) {
          x = variant == 1 ? std::round(d(rng) * 2) / 2 : d(rng);  // 1: many exact ties
          if (variant == 2 && rng() % 7 == 0) x = nan;
          if (variant == 3 && rng() % 11 == 0) x = (rng() % 2) ? inf : -inf;
        }
        if (variant == 4)  // nearly all NaN: fewer than k groups with a finite maximum (the fallback)
          for (int64_t i = 0; i < n; ++i)
            if (i % 97 != 0) score[i] = nan;
        auto id_of = [n](int64_t i) { return (i * 7919 + 3) % n; };
        std::vector<uk::Ranked<float>> want(n);
        for (int64_t i = 0; i < n; ++i) want[i] = {score[i], id_of(i), 100 + i};
        std::sort(want.begin(), want.end(), uk::ranks_before<float>);
        std::vector<uk::Ranked<float>> work, got(k);
        uk::select_top_k(score.data(), n, k, id_of, 100, work, got.data());
        for (int64_t x = 0; x < k; ++x) {
          ASSERT_EQ(got[x].id, want[x].id) << "n=" << n << " k=" << k << " variant " << variant << " position " << x;
          ASSERT_EQ(got[x].pos, want[x].pos);
        }
        ++cases;
      }
  EXPECT_GT(cases, 100);
}

template <typename T>
std::vector<T> normal_vec(int64_t n, Rng& rng) {
  std::normal_distribution<double> d(0.0, 1.0);
  std::vector<T> v(n);
  for (auto& e : v) e = T(d(rng));
  return v;
}

template <typename T>
class SmallMatmul : public ::testing::Test {};
using MatmulTypes = ::testing::Types<float, double>;
TYPED_TEST_SUITE(SmallMatmul, MatmulTypes);

TYPED_TEST(SmallMatmul, EveryIsaMatchesReferenceBitwise) {
  using T = TypeParam;
  OmpThreads one(1);
  Rng rng(12);
  // rows >= 4 take the register tiles (and 5, 9 a partial tile), N = 50 two tiles and a streamed tail,
  // K = 300 two passes over k.
  for (int64_t rows : {1, 2, 3, 4, 5, 8, 9})
    for (int64_t K : {1, 16, 20, 128, 131, 300})
      for (int64_t N : {1, 7, 50, 600}) {
        SCOPED_TRACE("rows=" + std::to_string(rows) + " K=" + std::to_string(K) + " N=" + std::to_string(N));
        const auto x = normal_vec<T>(rows * K, rng), w = normal_vec<T>(K * N, rng), b = normal_vec<T>(N * K, rng);
        std::vector<T> want(rows * N), want_nt(rows * N);
        uk::matmul_rows_ref<T>(rows, K, N, x.data(), w.data(), want.data());
        uk::matmul_rows_nt_ref<T>(rows, K, N, x.data(), b.data(), want_nt.data());
        std::vector<int32_t> pick = {int32_t(N - 1), 0, int32_t(N / 2), int32_t(N - 1)};
        std::vector<T> want_g(pick.size());
        uk::gathered_dots_ref<T>(K, x.data(), b.data(), pick.data(), int64_t(pick.size()), want_g.data());
        for (const auto& [name, tab] : isa_tables<T>()) {
          SCOPED_TRACE(name);
          std::vector<T> got(rows * N, T(-7)), got_nt(rows * N, T(-7)), got_g(pick.size(), T(-7));
          tab.matmul_rows(rows, K, N, x.data(), w.data(), got.data());
          tab.matmul_rows_nt(rows, K, N, x.data(), b.data(), got_nt.data());
          tab.gathered_dots(K, x.data(), b.data(), pick.data(), int64_t(pick.size()), got_g.data());
          EXPECT_TRUE(Identical(got, want));
          EXPECT_TRUE(Identical(got_nt, want_nt));
          EXPECT_TRUE(Identical(got_g, want_g));
        }
        // And the references are dot products (independent formula in double).
        for (int64_t t = 0; t < rows; ++t)
          for (int64_t j = 0; j < N; j += 97) {
            double e = 0, mag = 0;
            for (int64_t k = 0; k < K; ++k) {
              e += double(x[t * K + k]) * double(b[j * K + k]);
              mag += std::abs(double(x[t * K + k]) * double(b[j * K + k]));
            }
            ASSERT_NEAR(double(want_nt[t * N + j]), e, 1e-5 * mag + 1e-12);
            double f = 0, fmag = 0;
            for (int64_t k = 0; k < K; ++k) {
              f += double(x[t * K + k]) * double(w[k * N + j]);
              fmag += std::abs(double(x[t * K + k]) * double(w[k * N + j]));
            }
            ASSERT_NEAR(double(want[t * N + j]), f, 1e-5 * fmag + 1e-12);
          }
      }
}

// Compact key tables (bf16 bits, int8 with row scales): every ISA equals the reference bit for bit, the
// reference equals the widened table's dots (times the scale), and a compute-type table gives
// matmul_rows_nt / gathered_dots.
TYPED_TEST(SmallMatmul, CompactRowTablesMatchReferenceBitwise) {
  using T = TypeParam;
  OmpThreads one(1);
  Rng rng(14);
  for (int64_t rows : {1, 3, 4, 9})
    for (int64_t K : {1, 16, 20, 131, 1500})
      for (int64_t M : {1, 7, 600}) {
        SCOPED_TRACE("rows=" + std::to_string(rows) + " K=" + std::to_string(K) + " M=" + std::to_string(M));
        const auto x = normal_vec<T>(rows * K, rng);
        const auto bf = normal_vec<float>(M * K, rng);
        std::vector<uint16_t> b16(M * K);
        std::vector<int8_t> b8(M * K);
        std::vector<float> scale(M);
        for (int64_t e = 0; e < M * K; ++e) {
          uint32_t bits;
          std::memcpy(&bits, &bf[e], 4);
          b16[e] = uint16_t(bits >> 16);
          b8[e] = int8_t(std::clamp(std::lround(bf[e] * 40.0f), -127L, 127L));
        }
        for (int64_t j = 0; j < M; ++j) scale[j] = 0.01f + 0.001f * float(j % 13);
        const std::vector<int32_t> pick = {int32_t(M - 1), 0, int32_t(M / 2), int32_t(M - 1)};
        for (auto fmt : {uk::RowFormat::kBf16, uk::RowFormat::kInt8}) {
          SCOPED_TRACE(fmt == uk::RowFormat::kBf16 ? "bf16" : "int8");
          uk::RowTable<T> tab_q;
          tab_q.format = fmt;
          tab_q.data = fmt == uk::RowFormat::kBf16 ? static_cast<const void*>(b16.data()) : b8.data();
          tab_q.scale = scale.data();
          // The widened table in the compute type, for the independent check.
          std::vector<T> wide(M * K);
          for (int64_t e = 0; e < M * K; ++e) {
            const uint32_t bits = uint32_t(b16[e]) << 16;
            float f;
            std::memcpy(&f, &bits, 4);
            wide[e] = fmt == uk::RowFormat::kBf16 ? T(f) : T(b8[e]);
          }
          std::vector<T> want(rows * M), plain(rows * M);
          uk::matmul_rows_nt_q_ref<T>(rows, K, M, x.data(), tab_q, want.data());
          uk::matmul_rows_nt_ref<T>(rows, K, M, x.data(), wide.data(), plain.data());
          for (int64_t t = 0; t < rows; ++t)
            for (int64_t j = 0; j < M; ++j)
              ASSERT_EQ(want[t * M + j], fmt == uk::RowFormat::kInt8 ? plain[t * M + j] * T(scale[j]) : plain[t * M + j]);
          std::vector<T> want_g(pick.size());
          for (size_t g = 0; g < pick.size(); ++g) want_g[g] = want[pick[g]];  // row 0 of x
          for (const auto& [name, tab] : isa_tables<T>()) {
            SCOPED_TRACE(name);
            std::vector<T> got(rows * M, T(-7)), got_g(pick.size(), T(-7));
            tab.matmul_rows_nt_q(rows, K, M, x.data(), tab_q, got.data());
            tab.gathered_dots_q(K, x.data(), tab_q, pick.data(), int64_t(pick.size()), got_g.data());
            EXPECT_TRUE(Identical(got, want));
            EXPECT_TRUE(Identical(got_g, want_g));
          }
        }
        // A compute-type table is the plain product.
        const auto b = normal_vec<T>(M * K, rng);
        uk::RowTable<T> tab_c;
        tab_c.data = b.data();
        std::vector<T> got(rows * M), want(rows * M);
        uk::matmul_rows_nt_q<T>(rows, K, M, x.data(), tab_c, got.data());
        uk::matmul_rows_nt<T>(rows, K, M, x.data(), b.data(), want.data());
        EXPECT_TRUE(Identical(got, want));
      }
}

// int8 weights against int8-quantised activations: the quantisation's definition, every ISA equal to the
// reference bit for bit (rows that take the 4-, 2- and 1-row paths, K with and without a partial block,
// one and two threads), and the product within the quantisation's error of the float product of the
// widened weights.
TEST(SmallMatmulQ8, QuantisationIsPerBlockMaxAbsOver127) {
  const int64_t K = 40, Kp = uk::q8_padded(K);
  ASSERT_EQ(Kp, 64);
  std::vector<float> x(2 * K, 0.0f);
  for (int64_t i = 0; i < K; ++i) x[i] = float(i) - 10.5f;  // row 0; row 1 stays zero
  std::vector<int8_t> q(2 * Kp, int8_t(99));
  std::vector<float> s(2 * 2, -1.0f);
  uk::quantise_q8_rows(2, K, x.data(), q.data(), s.data());
  EXPECT_EQ(s[0], 20.5f / 127.0f);  // block 0 holds -10.5 .. 20.5
  for (int64_t b = 0; b < 2; ++b) {
    float amax = 0;
    for (int64_t i = b * 32; i < std::min<int64_t>(K, b * 32 + 32); ++i) amax = std::max(amax, std::fabs(x[i]));
    EXPECT_EQ(s[b], amax / 127.0f);
    for (int64_t i = b * 32; i < b * 32 + 32; ++i) {
      const int want = i < K ? int(std::nearbyint(x[i] * (127.0f / amax))) : 0;
      ASSERT_EQ(int(q[i]), want) << "i=" << i;
      if (i < K) ASSERT_LE(std::fabs(float(q[i]) * s[b] - x[i]), 0.5f * s[b] * 1.0001f);
    }
  }
  for (int64_t i = 0; i < Kp; ++i) ASSERT_EQ(int(q[Kp + i]), 0);
  EXPECT_EQ(s[2], 0.0f);
  EXPECT_EQ(s[3], 0.0f);
}

TEST(SmallMatmulQ8, EveryIsaEqualsReferenceAndIsNearTheFloatProduct) {
  Rng rng(21);
  for (int threads : {1, 2})
    for (int64_t rows : {1, 2, 3, 4, 7, 15})
      for (int64_t K : {32, 20, 70, 256, 688})
        for (int64_t M : {1, 5, 300, 1100}) {
          SCOPED_TRACE("threads=" + std::to_string(threads) + " rows=" + std::to_string(rows) + " K=" +
                       std::to_string(K) + " M=" + std::to_string(M));
          OmpThreads t(threads);
          const auto x = normal_vec<float>(rows * K, rng);
          const auto wf = normal_vec<float>(M * K, rng);
          std::vector<int8_t> w(M * K);
          for (int64_t e = 0; e < M * K; ++e) w[e] = int8_t(std::clamp(std::lround(wf[e] * 40.0f), -127L, 127L));
          std::vector<float> scale(M);
          for (int64_t j = 0; j < M; ++j) scale[j] = 0.01f + 0.001f * float(j % 13);
          std::vector<float> want(rows * M);
          uk::matmul_rows_q8_ref(rows, K, M, x.data(), w.data(), scale.data(), want.data());
          for (const auto& [name, tab] : isa_tables<float>()) {
            SCOPED_TRACE(name);
            ASSERT_NE(tab.matmul_rows_q8, nullptr);
            std::vector<float> got(rows * M, -7.0f);
            tab.matmul_rows_q8(rows, K, M, x.data(), w.data(), scale.data(), got.data());
            ASSERT_TRUE(Identical(got, want));
          }
          // Each x value is off by at most half a step (amax / 254) of its block.
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t j = 0; j < M; ++j) {
              double f = 0, bound = 0;
              for (int64_t b = 0; b * 32 < K; ++b) {
                double amax = 0;
                for (int64_t k = b * 32; k < std::min<int64_t>(K, b * 32 + 32); ++k)
                  amax = std::max(amax, std::fabs(double(x[r * K + k])));
                for (int64_t k = b * 32; k < std::min<int64_t>(K, b * 32 + 32); ++k) {
                  f += double(x[r * K + k]) * double(w[j * K + k]) * scale[j];
                  bound += amax / 254.0 * std::fabs(double(w[j * K + k]) * scale[j]);
                }
              }
              ASSERT_NEAR(double(want[r * M + j]), f, 1.001 * bound + 1e-5 * std::fabs(f) + 1e-6);
            }
        }
}

// Decode attention of one head: every ISA equals the reference bitwise, and the reference is
// softmax(K q)^T V (independent formula in double).
TYPED_TEST(SmallMatmul, AttendCachedMatchesReferenceAndSoftmaxFormula) {
  using T = TypeParam;
  Rng rng(13);
  for (int64_t S : {1, 2, 7, 64, 300})
    for (int64_t hd : {2, 16, 64, 30, 48, 40}) {  // 4-key dots need hd % 16 == 0; outputs go 32 at a time
      SCOPED_TRACE("S=" + std::to_string(S) + " hd=" + std::to_string(hd));
      auto q = normal_vec<T>(hd, rng);
      for (auto& e : q) e = T(e / std::sqrt(double(hd)));  // scaled as the attention scales it
      const auto K = normal_vec<T>(S * hd, rng), V = normal_vec<T>(S * hd, rng);
      std::vector<T> probs(S), want(hd);
      uk::attend_cached_ref<T>(S, hd, q.data(), K.data(), V.data(), probs.data(), want.data());
      for (const auto& [name, tab] : isa_tables<T>()) {
        SCOPED_TRACE(name);
        std::vector<T> p(S, T(-7)), got(hd, T(-7));
        tab.attend_cached(S, hd, q.data(), K.data(), V.data(), p.data(), got.data());
        EXPECT_TRUE(Identical(got, want));
      }
      std::vector<double> sc(S);
      double mx = -1e300, sum = 0;
      for (int64_t s = 0; s < S; ++s) {
        for (int64_t d = 0; d < hd; ++d) sc[s] += double(q[d]) * double(K[s * hd + d]);
        mx = std::max(mx, sc[s]);
      }
      for (auto& e : sc) sum += (e = std::exp(e - mx));
      for (int64_t d = 0; d < hd; ++d) {
        double o = 0, mag = 0;
        for (int64_t s = 0; s < S; ++s) {
          o += sc[s] / sum * double(V[s * hd + d]);
          mag += std::abs(sc[s] / sum * double(V[s * hd + d]));
        }
        ASSERT_NEAR(double(want[d]), o, 1e-5 * (mag + 1.0)) << "d=" << d;
      }
    }
}

// A row's product does not depend on the rows computed with it (streamed for 1-3 rows, register tiles
// from 4): what lets a sequence decode to the same bits alone or in a batch.
TEST(SmallMatmulDeterminism, RowResultIndependentOfBatch) {
  Rng rng(14);
  const int64_t K = 300, N = 77;
  for (const auto& [name, tab] : isa_tables<float>()) {
    SCOPED_TRACE(name);
    for (int64_t rows : {2, 3, 4, 7, 13}) {
      const auto x = normal_vec<float>(rows * K, rng), w = normal_vec<float>(K * N, rng);
      std::vector<float> all(rows * N), one(N);
      tab.matmul_rows(rows, K, N, x.data(), w.data(), all.data());
      for (int64_t t = 0; t < rows; ++t) {
        tab.matmul_rows(1, K, N, x.data() + t * K, w.data(), one.data());
        EXPECT_TRUE(Identical(one, std::vector<float>(all.begin() + t * N, all.begin() + (t + 1) * N)))
            << "rows=" << rows << " t=" << t;
      }
    }
  }
}

TEST(SmallMatmulDeterminism, IndependentOfThreadCount) {
  Rng rng(13);
  const int64_t rows = 6, K = 64, N = 5000;  // large enough for the parallel branch
  const auto x = normal_vec<float>(rows * K, rng), w = normal_vec<float>(K * N, rng), b = normal_vec<float>(N * K, rng);
  std::vector<float> a1(rows * N), n1(rows * N);
  {
    OmpThreads one(1);
    uk::matmul_rows<float>(rows, K, N, x.data(), w.data(), a1.data());
    uk::matmul_rows_nt<float>(rows, K, N, x.data(), b.data(), n1.data());
  }
  for (int threads : {2, 3}) {
    OmpThreads many(threads);
    std::vector<float> a(rows * N), nt(rows * N);
    uk::matmul_rows<float>(rows, K, N, x.data(), w.data(), a.data());
    uk::matmul_rows_nt<float>(rows, K, N, x.data(), b.data(), nt.data());
    EXPECT_TRUE(Identical(a, a1)) << threads;
    EXPECT_TRUE(Identical(nt, n1)) << threads;
  }
}

// =================================================================================================
// Pooled lookup over stored formats
// =================================================================================================

template <typename T>
struct Problem {
  PoolShape s;
  std::vector<float> values;      // [N, Dv] float source
  std::vector<uint16_t> bf16;     // [N, Dv]
  std::vector<int8_t> i8;         // [N, Dv]
  std::vector<float> scale;       // [N]
  std::vector<int64_t> index;     // [T, K]
  std::vector<T> scores;          // [T, K, C]
  std::vector<int64_t> perm;      // [E*N]
};

template <typename T>
Problem<T> make_problem(const PoolShape& s, uint32_t seed) {
  Problem<T> p;
  p.s = s;
  Rng rng(seed);
  std::normal_distribution<double> d(0.0, 1.0);
  p.values.resize(s.N * s.Dv);
  for (int64_t r = 0; r < s.N; ++r)
    for (int64_t c = 0; c < s.Dv; ++c) p.values[r * s.Dv + c] = float(d(rng) * (1 + r % 5));
  p.bf16.resize(p.values.size());
  uk::quantize_bf16(p.values.data(), int64_t(p.values.size()), p.bf16.data());
  p.i8.resize(p.values.size());
  p.scale.resize(s.N);
  EXPECT_EQ(uk::quantize_int8_rows(p.values.data(), s.N, s.Dv, p.i8.data(), p.scale.data()), -1);
  p.perm.resize(s.E * s.N);
  std::iota(p.perm.begin(), p.perm.end(), 0);
  std::shuffle(p.perm.begin(), p.perm.end(), rng);
  std::uniform_int_distribution<int64_t> gi(0, s.E * s.N - 1);
  p.index.resize(s.T * s.K);
  for (auto& e : p.index) e = gi(rng);
  if (s.T * s.K > 3) p.index[1] = p.index[2];  // a repeated hit
  p.scores.resize(s.T * s.K * s.C);
  for (auto& e : p.scores) e = T(d(rng));
  return p;
}

std::vector<PoolShape> shapes() {
  // {T, K, N, Dv, E, C}
  return {{1, 64, 1000, 32, 4, 2},  {3, 7, 13, 10, 9, 2},  {20, 16, 64, 24, 4, 3},   // 20 tokens: 2 chunks
          {5, 5, 7, 9, 1, 1},       {40, 12, 128, 16, 4, 4}, {0, 8, 10, 8, 4, 2},   {4, 0, 10, 8, 4, 2},
          {2, 33, 31, 37, 1, 1},    {17, 9, 256, 64, 16, 2}};
}

template <typename T>
using Bf16Fn = decltype(&uk::pooled_lookup_forward_bf16<T>);
template <typename T>
using Int8Fn = decltype(&uk::pooled_lookup_forward_int8<T>);

template <typename T>
std::vector<T> run_bf16(Bf16Fn<T> fn, const Problem<T>& p) {
  std::vector<T> out(p.s.T * p.s.E * p.s.Dv, std::numeric_limits<T>::quiet_NaN());
  fn(p.s, p.bf16.data(), p.index.data(), p.scores.data(), p.perm.data(), out.data());
  return out;
}
template <typename T>
std::vector<T> run_int8(Int8Fn<T> fn, const Problem<T>& p) {
  std::vector<T> out(p.s.T * p.s.E * p.s.Dv, std::numeric_limits<T>::quiet_NaN());
  fn(p.s, p.i8.data(), p.scale.data(), p.index.data(), p.scores.data(), p.perm.data(), out.data());
  return out;
}
// The float32 (or double) kernel on a given dense table.
template <typename T>
std::vector<T> run_dense(const Problem<T>& p, const std::vector<T>& table) {
  std::vector<T> out(p.s.T * p.s.E * p.s.Dv, std::numeric_limits<T>::quiet_NaN());
  uk::pooled_lookup_forward<T>(p.s, table.data(), p.index.data(), p.scores.data(), p.perm.data(), out.data());
  return out;
}

template <typename T>
class StoredPool : public ::testing::Test {};
using FloatTypes = ::testing::Types<float, double>;
TYPED_TEST_SUITE(StoredPool, FloatTypes);

TYPED_TEST(StoredPool, EveryIsaMatchesReferenceBitwise) {
  using T = TypeParam;
  OmpThreads one(1);
  uint32_t seed = 10;
  for (const auto& s : shapes()) {
    SCOPED_TRACE("T=" + std::to_string(s.T) + " K=" + std::to_string(s.K) + " N=" + std::to_string(s.N));
    const auto p = make_problem<T>(s, seed++);
    const auto want_b = run_bf16<T>(&uk::pooled_lookup_forward_bf16_ref<T>, p);
    const auto want_i = run_int8<T>(&uk::pooled_lookup_forward_int8_ref<T>, p);
    for (const auto& [name, tab] : isa_tables<T>()) {
      SCOPED_TRACE(name);
      EXPECT_TRUE(Identical(run_bf16<T>(tab.pooled_lookup_forward_bf16, p), want_b));
      EXPECT_TRUE(Identical(run_int8<T>(tab.pooled_lookup_forward_int8, p), want_i));
    }
    EXPECT_TRUE(Identical(run_bf16<T>(&uk::pooled_lookup_forward_bf16<T>, p), want_b)) << "public bf16";
    EXPECT_TRUE(Identical(run_int8<T>(&uk::pooled_lookup_forward_int8<T>, p), want_i)) << "public int8";
  }
}

// Widening bf16 is exact and the kernels apply the same operations in the same order, so the bf16
// lookup equals the dense kernel on the widened table bit for bit.
TYPED_TEST(StoredPool, Bf16EqualsDenseKernelOnWidenedTable) {
  using T = TypeParam;
  uint32_t seed = 30;
  for (const auto& s : shapes()) {
    const auto p = make_problem<T>(s, seed++);
    std::vector<T> widened(p.bf16.size());
    for (size_t i = 0; i < widened.size(); ++i) widened[i] = T(uk::bf16_to_float(p.bf16[i]));
    EXPECT_TRUE(Identical(run_bf16<T>(&uk::pooled_lookup_forward_bf16<T>, p), run_dense<T>(p, widened)));
  }
}

// int8 folds the row scale into the weight ((w * s) * q) where the dense kernel on the dequantised
// table computes w * (q * s): equal up to two roundings per term.
TYPED_TEST(StoredPool, Int8MatchesDenseKernelOnDequantisedTable) {
  using T = TypeParam;
  uint32_t seed = 50;
  const double eps = std::numeric_limits<T>::epsilon();
  for (const auto& s : shapes()) {
    const auto p = make_problem<T>(s, seed++);
    std::vector<float> deq(p.i8.size());
    uk::dequantize_int8_rows(p.i8.data(), p.scale.data(), s.N, s.Dv, deq.data());
    const std::vector<T> deq_t(deq.begin(), deq.end());
    // Magnitude of every output element: the dense kernel on |scores| and |table|.
    Problem<T> pa = p;
    for (auto& v : pa.scores) v = std::abs(v);
    std::vector<T> abs_table(deq_t.size());
    for (size_t i = 0; i < abs_table.size(); ++i) abs_table[i] = std::abs(deq_t[i]);
    const auto mag = run_dense<T>(pa, abs_table);
    const auto got = run_int8<T>(&uk::pooled_lookup_forward_int8<T>, p);
    const auto want = run_dense<T>(p, deq_t);
    // float dequantisation rounds q * s once in float: relative 2^-24 even for T = double.
    const double rel = 4 * std::max(eps, double(std::numeric_limits<float>::epsilon()));
    for (size_t i = 0; i < got.size(); ++i)
      ASSERT_LE(std::abs(double(got[i]) - double(want[i])), rel * double(mag[i]) + 1e-300) << "element " << i;
  }
}

// And the stored formats stay close to the unquantised float table: the per-element error bounds of
// value_quant.h carried through the weighted sums.
TEST(StoredPoolAccuracy, CloseToFloatTableWithinQuantisationBounds) {
  const PoolShape s{12, 32, 500, 64, 4, 2};
  const auto p = make_problem<float>(s, 70);
  std::vector<double> exact(s.T * s.E * s.Dv, 0.0), bound_b(exact.size(), 0.0), bound_i(exact.size(), 0.0);
  const int64_t Ds = s.Dv / s.C, W = s.E * s.Dv;
  for (int64_t t = 0; t < s.T; ++t)
    for (int64_t k = 0; k < s.K; ++k) {
      const int64_t v = p.perm[p.index[t * s.K + k]], g = v / s.N, row = v % s.N;
      for (int64_t d = 0; d < s.Dv; ++d) {
        const double w = p.scores[(t * s.K + k) * s.C + d / Ds], x = p.values[row * s.Dv + d];
        exact[t * W + g * s.Dv + d] += w * x;
        bound_b[t * W + g * s.Dv + d] += std::abs(w) * (std::ldexp(std::abs(x), -8) + 1e-6 * std::abs(x));
        bound_i[t * W + g * s.Dv + d] += std::abs(w) * (0.5 * p.scale[row] * (1 + 1e-5) + 1e-6 * std::abs(x));
      }
    }
  const auto b = run_bf16<float>(&uk::pooled_lookup_forward_bf16<float>, p);
  const auto i8 = run_int8<float>(&uk::pooled_lookup_forward_int8<float>, p);
  double max_b = 0, max_i = 0;
  for (size_t e = 0; e < exact.size(); ++e) {
    ASSERT_LE(std::abs(b[e] - exact[e]), bound_b[e] + 1e-5) << "bf16 element " << e;
    ASSERT_LE(std::abs(i8[e] - exact[e]), bound_i[e] + 1e-5) << "int8 element " << e;
    max_b = std::max(max_b, std::abs(b[e] - exact[e]));
    max_i = std::max(max_i, std::abs(i8[e] - exact[e]));
  }
  EXPECT_GT(max_i, 0.0) << "int8 must actually quantise";
  EXPECT_GT(max_b, 0.0) << "bf16 must actually round";
}

TEST(StoredPoolDeterminism, IndependentOfThreadCount) {
  const std::vector<PoolShape> many = {{70, 16, 300, 32, 4, 2}, {33, 9, 17, 12, 9, 4}, {2, 64, 100, 16, 4, 2}};
  uint32_t seed = 90;
  for (const auto& s : many) {
    const auto p = make_problem<float>(s, seed++);
    std::vector<float> b1, i1, f1;
    {
      OmpThreads one(1);
      b1 = run_bf16<float>(&uk::pooled_lookup_forward_bf16<float>, p);
      i1 = run_int8<float>(&uk::pooled_lookup_forward_int8<float>, p);
      f1 = run_dense<float>(p, p.values);
    }
    EXPECT_TRUE(Identical(b1, run_bf16<float>(&uk::pooled_lookup_forward_bf16_ref<float>, p)));
    for (int threads : {2, 3}) {
      OmpThreads many_threads(threads);
      EXPECT_TRUE(Identical(run_bf16<float>(&uk::pooled_lookup_forward_bf16<float>, p), b1)) << threads;
      EXPECT_TRUE(Identical(run_int8<float>(&uk::pooled_lookup_forward_int8<float>, p), i1)) << threads;
      EXPECT_TRUE(Identical(run_dense<float>(p, p.values), f1)) << threads;
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Value tables in a file behind a bounded row cache (issue 17).

struct TableDir {
  std::string path;
  TableDir() {
    std::string t = (std::filesystem::temp_directory_path() / "ultramem_table_XXXXXX").string();
    if (!::mkdtemp(t.data())) throw std::runtime_error("mkdtemp");
    path = t;
  }
  ~TableDir() { std::filesystem::remove_all(path); }
  std::string file(const std::string& name) const { return path + "/" + name; }
};

// The rows of the in-RAM table a file is compared with: the same generator, quantised by value_quant.
void expected_int8(int64_t rows, int64_t dv, uint64_t seed, std::vector<int8_t>& q, std::vector<float>& scale) {
  std::vector<float> f(size_t(rows * dv));
  uk::gaussian_rows(seed, 0.5f, 0, rows, dv, f.data());
  q.resize(f.size());
  scale.resize(size_t(rows));
  ASSERT_EQ(uk::quantize_int8_rows(f.data(), rows, dv, q.data(), scale.data()), -1);
}

TEST(ValueTableFile, StreamedRowsEqualTheInMemoryTableInAnyChunking) {
  TableDir dir;
  const int64_t rows = 5000, dv = 24;
  std::vector<float> whole(size_t(rows * dv)), part(size_t(7 * dv));
  uk::gaussian_rows(9, 0.5f, 0, rows, dv, whole.data());
  uk::gaussian_rows(9, 0.5f, 1234, 7, dv, part.data());
  for (int64_t i = 0; i < 7 * dv; ++i) ASSERT_TRUE(same_bits(part[size_t(i)], whole[size_t(1234 * dv + i)]));
  auto fill = [&](int64_t first, int64_t count, float* out) { uk::gaussian_rows(9, 0.5f, first, count, dv, out); };
  for (const auto format : {uk::TableFormat::kInt8, uk::TableFormat::kBf16}) {
    const std::string a = dir.file(std::string("a.") + uk::to_string(format)), b = a + ".b";
    int64_t reported = 0;
    uk::write_table_file(a, format, rows, dv, fill, 333, [&](int64_t done) { reported = done; });
    uk::write_table_file(b, format, rows, dv, fill, 4096);
    EXPECT_EQ(reported, rows);
    std::ifstream fa(a, std::ios::binary), fb(b, std::ios::binary);
    const std::string ca((std::istreambuf_iterator<char>(fa)), {}), cb((std::istreambuf_iterator<char>(fb)), {});
    EXPECT_EQ(ca, cb) << "the chunking changed the file";
    const auto info = uk::read_table_header(a);
    EXPECT_EQ(info.rows, rows);
    EXPECT_EQ(info.dv, dv);
    EXPECT_EQ(info.format, format);
    EXPECT_EQ(int64_t(ca.size()), info.data_offset + rows * info.row_bytes);
  }
}

// Whether the filesystem under `dir` takes direct reads (O_DIRECT); tmpfs does not.
bool direct_reads_work(const std::string& file) {
  const int fd = ::open(file.c_str(), O_RDONLY | O_DIRECT);
  if (fd >= 0) ::close(fd);
  return fd >= 0;
}

// The cache in front of the file, smaller than the table, gives every row exactly as the in-RAM table holds
// it, over many steps of random rows (evictions included), with either reader, reads direct or buffered.
// The table's size is not a whole number of pages, so a direct read of its last rows ends past the file.
TEST(RowCache, RowsThroughASmallCacheEqualTheInMemoryTable) {
  TableDir dir;
  const int64_t rows = (1 << 16) - 3, dv = 32;
  const std::string path = dir.file("t.int8");
  uk::write_table_file(path, uk::TableFormat::kInt8, rows, dv,
                       [&](int64_t first, int64_t count, float* out) { uk::gaussian_rows(5, 0.5f, first, count, dv, out); });
  ASSERT_NE(std::filesystem::file_size(path) % 4096, 0u);
  std::vector<int8_t> q;
  std::vector<float> scale;
  expected_int8(rows, dv, 5, q, scale);
  for (const auto& [uring, direct] : {std::pair{true, true}, {true, false}, {false, true}, {false, false}}) {
    SCOPED_TRACE(std::string(uring ? "io_uring" : "pread") + (direct ? ", direct" : ", buffered"));
    uk::RowCache cache(path, 4096 * (dv + 64), uring, direct);  // about 4096 slots for 65536 rows
    EXPECT_EQ(cache.uses_io_uring(), uring) << "io_uring works on these machines";
    EXPECT_EQ(cache.uses_direct_io(), direct && direct_reads_work(path));
    EXPECT_LT(cache.capacity_rows(), rows / 8);
    EXPECT_LE(cache.memory_bytes(), 4096 * (dv + 64));
    Rng rng(3);
    std::uniform_int_distribution<int64_t> any(0, rows - 1);
    for (int step = 0; step < 200; ++step) {
      std::vector<int64_t> want(512), slots(512);
      for (auto& r : want) r = step % 2 ? any(rng) : any(rng) % 64;  // alternating cold and hot rows
      if (step % 10 == 1) want[7] = rows - 1 - step % 3;               // the file's last rows
      cache.fetch(want.data(), int64_t(want.size()), slots.data());
      for (size_t i = 0; i < want.size(); ++i) {
        ASSERT_GE(slots[i], 0);
        ASSERT_LT(slots[i], cache.capacity_rows());
        ASSERT_EQ(std::memcmp(cache.int8_values() + slots[i] * dv, q.data() + want[i] * dv, size_t(dv)), 0) << step;
        ASSERT_TRUE(same_bits(cache.int8_scales()[slots[i]], scale[size_t(want[i])]));
      }
    }
    const auto st = cache.stats();
    EXPECT_EQ(st.lookups, 200 * 512);
    EXPECT_EQ(st.hits + st.misses, st.lookups);
    EXPECT_GT(st.hits, st.lookups / 3) << "the 64 hot rows stay resident";
    EXPECT_LE(st.reads, st.misses);
    EXPECT_GE(st.bytes_read, st.misses * (dv + 4));
    // More distinct rows in one step than slots: a clear error.
    std::vector<int64_t> too_many(size_t(cache.capacity_rows() + 1)), out(too_many.size());
    std::iota(too_many.begin(), too_many.end(), 0);
    EXPECT_THROW(cache.fetch(too_many.data(), int64_t(too_many.size()), out.data()), std::invalid_argument);
    const int64_t outside = rows;
    EXPECT_THROW(cache.fetch(&outside, 1, out.data()), std::invalid_argument);
    // After the refused steps the cache still gives every row right.
    std::vector<int64_t> again(256), slots(256);
    std::iota(again.begin(), again.end(), 1000);
    cache.fetch(again.data(), int64_t(again.size()), slots.data());
    for (size_t i = 0; i < again.size(); ++i)
      ASSERT_EQ(std::memcmp(cache.int8_values() + slots[i] * dv, q.data() + again[i] * dv, size_t(dv)), 0);
  }
}

// The pooled lookup through the cache (rows resolved through the permutation, then to slots) is
// bit-identical to the in-RAM table's, for int8 and bf16, with the stored permutation and with the
// Feistel permutation (whose materialisation is the stored one).
TEST(RowCache, PooledLookupThroughTheCacheIsBitIdenticalToTheInMemoryTable) {
  TableDir dir;
  const int64_t N = 1 << 14, Dv = 32, E = 4, C = 2, T = 16, K = 24;
  const PoolShape shape{T, K, N, Dv, E, C};
  auto fill = [&](int64_t first, int64_t count, float* out) { uk::gaussian_rows(11, 0.5f, first, count, Dv, out); };
  std::vector<float> f(size_t(N * Dv));
  fill(0, N, f.data());
  const uk::FeistelPermutation feistel(uint64_t(E * N), 77);
  std::vector<int64_t> perm(size_t(E * N));
  for (int64_t g = 0; g < E * N; ++g) perm[size_t(g)] = int64_t(feistel.forward(uint64_t(g)));
  Rng rng(4);
  std::uniform_int_distribution<int64_t> grid(0, E * N - 1);
  std::normal_distribution<float> nd;
  for (const auto format : {uk::TableFormat::kInt8, uk::TableFormat::kBf16}) {
    const std::string path = dir.file(std::string("p.") + uk::to_string(format));
    uk::write_table_file(path, format, N, Dv, fill);
    uk::RowCache cache(path, 2048 * (Dv * 2 + 64));
    const int64_t cap = cache.capacity_rows();
    std::vector<int64_t> ident(size_t(E * cap));
    std::iota(ident.begin(), ident.end(), 0);
    std::vector<int8_t> q(size_t(N * Dv));
    std::vector<float> qs(static_cast<size_t>(N));
    std::vector<uint16_t> b(size_t(N * Dv));
    if (format == uk::TableFormat::kInt8) ASSERT_EQ(uk::quantize_int8_rows(f.data(), N, Dv, q.data(), qs.data()), -1);
    else uk::quantize_bf16(f.data(), N * Dv, b.data());
    for (int step = 0; step < 20; ++step) {
      std::vector<int64_t> index(size_t(T * K));
      std::vector<float> scores(size_t(T * K * C));
      for (auto& g : index) g = grid(rng);
      for (auto& x : scores) x = nd(rng);
      std::vector<float> want(size_t(T * E * Dv)), got(want.size());
      if (format == uk::TableFormat::kInt8)
        uk::pooled_lookup_forward_int8<float>(shape, q.data(), qs.data(), index.data(), scores.data(), perm.data(), want.data());
      else
        uk::pooled_lookup_forward_bf16<float>(shape, b.data(), index.data(), scores.data(), perm.data(), want.data());
      // Through the cache: v = feistel(g) (no stored permutation), group p = v / N, row = v % N -> slot;
      // the kernel then reads slot rows of a table of cap rows through the identity.
      std::vector<int64_t> want_rows(index.size()), slots(index.size()), resolved(index.size());
      for (size_t i = 0; i < index.size(); ++i) want_rows[i] = int64_t(feistel.forward(uint64_t(index[i]))) % N;
      cache.fetch(want_rows.data(), int64_t(want_rows.size()), slots.data());
      for (size_t i = 0; i < index.size(); ++i)
        resolved[i] = int64_t(feistel.forward(uint64_t(index[i]))) / N * cap + slots[i];
      const PoolShape cached{T, K, cap, Dv, E, C};
      if (format == uk::TableFormat::kInt8)
        uk::pooled_lookup_forward_int8<float>(cached, cache.int8_values(), cache.int8_scales(), resolved.data(),
                                              scores.data(), ident.data(), got.data());
      else
        uk::pooled_lookup_forward_bf16<float>(cached, cache.bf16_values(), resolved.data(), scores.data(), ident.data(),
                                              got.data());
      for (size_t i = 0; i < want.size(); ++i) ASSERT_TRUE(same_bits(want[i], got[i])) << uk::to_string(format) << " " << i;
    }
  }
}

TEST(ValueTableFile, DamagedMissingAndTruncatedFilesAreClearErrors) {
  TableDir dir;
  const std::string path = dir.file("t.int8");
  uk::write_table_file(path, uk::TableFormat::kInt8, 3000, 16,
                       [](int64_t first, int64_t count, float* out) { uk::gaussian_rows(1, 1.0f, first, count, 16, out); });
  auto error_of = [](const std::string& p) {
    try {
      (void)uk::read_table_header(p);
    } catch (const std::runtime_error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(error_of(dir.file("missing")).find("cannot open"), std::string::npos);
  std::filesystem::copy_file(path, dir.file("short"));
  std::filesystem::resize_file(dir.file("short"), std::filesystem::file_size(path) - 20);
  EXPECT_NE(error_of(dir.file("short")).find("truncated or damaged"), std::string::npos) << error_of(dir.file("short"));
  EXPECT_THROW(uk::RowCache(dir.file("short"), 1 << 20), std::runtime_error);
  std::filesystem::copy_file(path, dir.file("long"));
  std::filesystem::resize_file(dir.file("long"), std::filesystem::file_size(path) + 4096);
  EXPECT_NE(error_of(dir.file("long")).find("truncated or damaged"), std::string::npos);
  {
    std::filesystem::copy_file(path, dir.file("hdr"));
    std::fstream h(dir.file("hdr"), std::ios::in | std::ios::out | std::ios::binary);
    h.seekp(16);
    h.put(char(0x7f));  // the row count
  }
  EXPECT_NE(error_of(dir.file("hdr")).find("header is damaged"), std::string::npos) << error_of(dir.file("hdr"));
  std::ofstream(dir.file("text")) << "not a table at all";
  EXPECT_NE(error_of(dir.file("text")).find("not a value table"), std::string::npos);
  EXPECT_THROW(uk::write_table_file(dir.file("nan"), uk::TableFormat::kInt8, 10, 4,
                                    [](int64_t, int64_t count, float* out) {
                                      std::fill(out, out + count * 4, std::numeric_limits<float>::quiet_NaN());
                                    }),
               std::runtime_error);
  EXPECT_FALSE(std::filesystem::exists(dir.file("nan")));
}

// A full disk while writing (a file-size limit: the write fails as it would with ENOSPC) leaves no file
// at the path and no temporary: nothing half-written can pass for a table.
TEST(ValueTableFile, AFullDiskLeavesNoFileThatLooksComplete) {
  TableDir dir;
  const std::string path = dir.file("full.int8");
  rlimit old{};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old), 0);
  const auto old_handler = ::signal(SIGXFSZ, SIG_IGN);
  rlimit small = old;
  small.rlim_cur = 64 * 1024;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
  std::string error;
  try {
    uk::write_table_file(path, uk::TableFormat::kInt8, 100000, 64,
                         [](int64_t first, int64_t count, float* out) { uk::gaussian_rows(2, 1.0f, first, count, 64, out); });
  } catch (const std::runtime_error& e) {
    error = e.what();
  }
  ::setrlimit(RLIMIT_FSIZE, &old);
  ::signal(SIGXFSZ, old_handler);
  EXPECT_NE(error.find("failed"), std::string::npos) << error;
  EXPECT_FALSE(std::filesystem::exists(path));
  for (const auto& e : std::filesystem::directory_iterator(dir.path)) ADD_FAILURE() << "left behind: " << e.path();
}

}  // namespace
