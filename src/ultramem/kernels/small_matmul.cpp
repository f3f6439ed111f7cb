// Few-row matrix products (see small_matmul.h). Compiled once per ISA (UM_ISA = generic | avx2);
// the references in the generic build only.
#include "ultramem/kernels/small_matmul.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "ultramem/kernels/kernel_table.h"
#include "ultramem/kernels/simd.h"

namespace ultramem::kernels {
namespace {

constexpr int kLanes = 16;

// Sum of 16 partial sums in a fixed tree: h[l] = a[l] + a[l + 8], then ((h0+h1)+(h2+h3))+((h4+h5)+(h6+h7)).
template <typename T>
inline T reduce16(const T* a) {
  T h[8];
  for (int l = 0; l < 8; ++l) h[l] = a[l] + a[l + 8];
  return ((h[0] + h[1]) + (h[2] + h[3])) + ((h[4] + h[5]) + (h[6] + h[7]));
}

#if defined(__AVX2__)
// The same tree with AVX2 (bitwise equal: the same additions in the same pairing).
inline float reduce16(__m256 a0, __m256 a1) {
  __m256 h = _mm256_add_ps(a0, a1);     // h0..h7
  h = _mm256_hadd_ps(h, h);             // (h0+h1, h2+h3, .., ..) | (h4+h5, h6+h7, .., ..)
  h = _mm256_hadd_ps(h, h);             // ((h0+h1)+(h2+h3)) x4 | ((h4+h5)+(h6+h7)) x4
  return _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}
#endif

// out[t * ldo] = <x[t * K : t * K + K], row> for t < TB, with lane l summing the products of
// elements i = l mod 16. A partial last block of 16 is padded with zero products.
template <typename T, int TB>
inline void dots(const T* __restrict x, const T* __restrict row, int64_t K, T* out, int64_t ldo) {
  T acc[TB][kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= K; i += kLanes)
    for (int t = 0; t < TB; ++t)
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) acc[t][l] += x[t * K + i + l] * row[i + l];
  if (i < K) {
    T xt[TB][kLanes] = {}, rt[kLanes] = {};
    for (int64_t j = i; j < K; ++j) {
      rt[j - i] = row[j];
      for (int t = 0; t < TB; ++t) xt[t][j - i] = x[t * K + j];
    }
    for (int t = 0; t < TB; ++t)
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) acc[t][l] += xt[t][l] * rt[l];
  }
  for (int t = 0; t < TB; ++t) out[t * ldo] = reduce16(acc[t]);
}

#if defined(__AVX2__)
// float specialisation with the accumulators pinned in registers (same arithmetic as above). The row
// is float, or compact (kernels::RowFormat) and read in place: 8 bf16 bits or int8 values widened
// exactly to float per load, so the products and sums are those of the widened row (bitwise equal).
template <int TB, RowFormat F = RowFormat::kCompute>
inline void dots_avx2(const float* __restrict x, const void* __restrict row_v, int64_t K, float* out, int64_t ldo) {
  auto load8 = [&](int64_t i) {
    if constexpr (F == RowFormat::kBf16) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(row_v) + i));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    } else if constexpr (F == RowFormat::kInt8) {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(row_v) + i));
      return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
    } else {
      return _mm256_loadu_ps(static_cast<const float*>(row_v) + i);
    }
  };
  auto elem = [&](int64_t j) {
    if constexpr (F == RowFormat::kBf16)
      return __builtin_bit_cast(float, uint32_t(static_cast<const uint16_t*>(row_v)[j]) << 16);
    else if constexpr (F == RowFormat::kInt8)
      return float(static_cast<const int8_t*>(row_v)[j]);
    else
      return static_cast<const float*>(row_v)[j];
  };
  __m256 a0[TB], a1[TB];
  for (int t = 0; t < TB; ++t) a0[t] = a1[t] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + kLanes <= K; i += kLanes) {
    const __m256 r0 = load8(i), r1 = load8(i + 8);
    for (int t = 0; t < TB; ++t) {
      a0[t] = _mm256_add_ps(a0[t], _mm256_mul_ps(_mm256_loadu_ps(x + t * K + i), r0));
      a1[t] = _mm256_add_ps(a1[t], _mm256_mul_ps(_mm256_loadu_ps(x + t * K + i + 8), r1));
    }
  }
  if (i < K) {
    alignas(32) float xt[TB][kLanes] = {}, rt[kLanes] = {};
    for (int64_t j = i; j < K; ++j) {
      rt[j - i] = elem(j);
      for (int t = 0; t < TB; ++t) xt[t][j - i] = x[t * K + j];
    }
    const __m256 r0 = _mm256_load_ps(rt), r1 = _mm256_load_ps(rt + 8);
    for (int t = 0; t < TB; ++t) {
      a0[t] = _mm256_add_ps(a0[t], _mm256_mul_ps(_mm256_load_ps(xt[t]), r0));
      a1[t] = _mm256_add_ps(a1[t], _mm256_mul_ps(_mm256_load_ps(xt[t] + 8), r1));
    }
  }
  for (int t = 0; t < TB; ++t) out[t * ldo] = reduce16(a0[t], a1[t]);
}
template <>
inline void dots<float, 1>(const float* x, const float* row, int64_t K, float* out, int64_t ldo) {
  dots_avx2<1>(x, row, K, out, ldo);
}
template <>
inline void dots<float, 2>(const float* x, const float* row, int64_t K, float* out, int64_t ldo) {
  dots_avx2<2>(x, row, K, out, ldo);
}
template <>
inline void dots<float, 4>(const float* x, const float* row, int64_t K, float* out, int64_t ldo) {
  dots_avx2<4>(x, row, K, out, ldo);
}

#endif


}  // namespace

namespace UM_ISA {
namespace {

constexpr int64_t kColBlock = 512;  // output columns per block (rows x 2 KiB of out stay in L1/L2)

constexpr int64_t kOutBytesInCache = 256 << 10;  // output rows this small stay in L2 over a whole pass

// From this many rows on, matmul_rows keeps a tile of kTileRows x kTileCols outputs in registers.
constexpr int64_t kTileRows = 4;
constexpr int64_t kTileCols = 24;
constexpr int64_t kTileDepth = 256;  // k per pass: a [256 x 24] panel of w stays in L1 across row tiles

// out[t, j0 : j0 + nb] for t < rows, streaming w row by row: each row k of the block is read once and
// fused into every output row. Used for few rows, where the kernel is bound by reading w: when the
// output rows are small, each block is as wide as the columns one thread gets, so w is read in long
// sequential runs (512-column blocks read a wide w in 2 KB pieces with a stride, which reached only a
// third of the sequential bandwidth from DRAM: 9 vs 28 GB/s at 1 row, [512 x 1536]; D.13).
template <typename T>
void stream_block(int64_t rows, int64_t K, int64_t N, int64_t j0, int64_t nb, const T* x, const T* w, T* out) {
  for (int64_t t = 0; t < rows; ++t) std::memset(out + t * N + j0, 0, sizeof(T) * nb);
  for (int64_t k = 0; k < K; ++k) {
    const T* wr = w + k * N + j0;
    for (int64_t t = 0; t < rows; ++t) simd::fma_axpy(out + t * N + j0, x[t * K + k], wr, nb);
  }
}

// A register tile: out[r, c] for r < RB, c < kTileCols continues its chain of fused multiply-adds over
// k in [k0, k1) (from zero when k0 == 0, else from the value stored by the previous pass, which is the
// same chain). x is [RB, K] with row stride K, w and out point at the tile's first column.
template <typename T, int RB>
inline void tile_pass(int64_t K, int64_t N, int64_t k0, int64_t k1, const T* __restrict x, const T* __restrict w,
                      T* __restrict out) {
  T acc[RB][kTileCols];
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < kTileCols; ++c) acc[r][c] = k0 == 0 ? T(0) : out[r * N + c];
  for (int64_t k = k0; k < k1; ++k) {
    const T* wr = w + k * N;
    for (int r = 0; r < RB; ++r) {
      const T a = x[r * K + k];
#pragma omp simd
      for (int c = 0; c < kTileCols; ++c) acc[r][c] = std::fma(a, wr[c], acc[r][c]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < kTileCols; ++c) out[r * N + c] = acc[r][c];
}

#if defined(__AVX2__)
// The float tile with its 3 x RB accumulators in registers (the same fused chain, so the same bits).
// With kPrefetch (the first row tile of a pass) it also prefetches the next panel's part of each row
// k: a panel reads 96 bytes per row with a stride of N floats, which from DRAM ran at 8 GB/s without
// prefetch and at 17-25 with it (4-8 rows; the rows after the first tile find the panel in L1).
template <int RB, bool kPrefetch>
inline void tile_pass_avx2(int64_t K, int64_t N, int64_t k0, int64_t k1, const float* __restrict x,
                           const float* __restrict w, float* __restrict out) {
  // The loops are unrolled before vectorisation (GCC unroll pragmas); without them GCC -O3 kept the
  // accumulators in registers but also stored all of them to the stack on every k (half the speed).
  __m256 acc[RB][3];
  if (k0 == 0) {
#pragma GCC unroll 4
    for (int r = 0; r < RB; ++r)
#pragma GCC unroll 3
      for (int c = 0; c < 3; ++c) acc[r][c] = _mm256_setzero_ps();
  } else {
#pragma GCC unroll 4
    for (int r = 0; r < RB; ++r)
#pragma GCC unroll 3
      for (int c = 0; c < 3; ++c) acc[r][c] = _mm256_loadu_ps(out + r * N + 8 * c);
  }
  const float* wr = w + k0 * N;
  for (int64_t k = k0; k < k1; ++k, wr += N) {
    if constexpr (kPrefetch) {
      // The address may lie past w (integer arithmetic, no pointer past the end): prefetches do not fault.
      const auto next = reinterpret_cast<uintptr_t>(wr) + kTileCols * sizeof(float);
      _mm_prefetch(reinterpret_cast<const char*>(next), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(next + 64), _MM_HINT_T0);
    }
    __m256 wv[3];
#pragma GCC unroll 3
    for (int c = 0; c < 3; ++c) wv[c] = _mm256_loadu_ps(wr + 8 * c);
#pragma GCC unroll 4
    for (int r = 0; r < RB; ++r) {
      const __m256 a = _mm256_broadcast_ss(x + r * K + k);
#pragma GCC unroll 3
      for (int c = 0; c < 3; ++c) acc[r][c] = _mm256_fmadd_ps(a, wv[c], acc[r][c]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 3
    for (int c = 0; c < 3; ++c) _mm256_storeu_ps(out + r * N + 8 * c, acc[r][c]);
}
#endif

template <typename T, int RB, bool kPrefetch = false>
inline void tile(int64_t K, int64_t N, int64_t k0, int64_t k1, const T* x, const T* w, T* out) {
#if defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) return tile_pass_avx2<RB, kPrefetch>(K, N, k0, k1, x, w, out);
#endif
  tile_pass<T, RB>(K, N, k0, k1, x, w, out);
}

// Columns [j0, j0 + panels * kTileCols) of every row, in passes of kTileDepth over k.
template <typename T>
void tiled_block(int64_t rows, int64_t K, int64_t N, int64_t j0, int64_t panels, const T* x, const T* w, T* out) {
  for (int64_t p = 0; p < panels; ++p) {
    const int64_t j = j0 + p * kTileCols;
    for (int64_t k0 = 0; k0 < K; k0 += kTileDepth) {
      const int64_t k1 = std::min(K, k0 + kTileDepth);
      tile<T, kTileRows, true>(K, N, k0, k1, x, w + j, out + j);  // rows >= kTileRows here
      int64_t t = kTileRows;
      for (; t + kTileRows <= rows; t += kTileRows) tile<T, kTileRows>(K, N, k0, k1, x + t * K, w + j, out + t * N + j);
      const T* xt = x + t * K;
      T* ot = out + t * N + j;
      switch (rows - t) {
        case 3: tile<T, 3>(K, N, k0, k1, xt, w + j, ot); break;
        case 2: tile<T, 2>(K, N, k0, k1, xt, w + j, ot); break;
        case 1: tile<T, 1>(K, N, k0, k1, xt, w + j, ot); break;
        default: break;
      }
    }
  }
}

// out[t, j] is the chain acc = fma(x[t, k], w[k, j], acc) over k ascending from zero, whichever path
// computes it (streamed for fewer than kTileRows rows, register tiles from there on, the columns past
// the last whole tile streamed), so the bits depend on neither the row count, the ISA nor the threads.
template <typename T>
void matmul_rows_impl(int64_t rows, int64_t K, int64_t N, const T* x, const T* w, T* out) {
  const bool parallel = rows * K * N >= (int64_t(1) << 22);
  const int64_t threads = parallel ? std::max(1, omp_get_max_threads()) : 1;
  if (rows >= kTileRows && N >= kTileCols) {
    const int64_t panels = N / kTileCols, tail = N - panels * kTileCols;
    const int64_t per = (panels + threads - 1) / threads;
#pragma omp parallel for schedule(static) if (threads > 1)
    for (int64_t b = 0; b < threads; ++b) {
      const int64_t p0 = std::min(panels, b * per), p1 = std::min(panels, p0 + per);
      if (p1 > p0) tiled_block<T>(rows, K, N, p0 * kTileCols, p1 - p0, x, w, out);
    }
    if (tail > 0) stream_block<T>(rows, K, N, panels * kTileCols, tail, x, w, out);
    return;
  }
  int64_t width = kColBlock;
  if (rows * N * int64_t(sizeof(T)) <= kOutBytesInCache)
    width = std::max(kColBlock, ((N + threads - 1) / threads + 15) / 16 * 16);
  const int64_t blocks = (N + width - 1) / width;
#pragma omp parallel for schedule(static) if (blocks > 1 && parallel)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t j0 = b * width;
    stream_block<T>(rows, K, N, j0, std::min(width, N - j0), x, w, out);
  }
}

// x rows per pass of the dot-product kernels over a block of b rows: 16 rows of up to 512 floats (32 KB)
// stay in L1 (at batch 64 streaming all of x per b row read it from L2 each time: 3.4x slower).
constexpr int64_t kXRows = 16;

template <typename T>
void matmul_rows_nt_impl(int64_t rows, int64_t K, int64_t M, const T* x, const T* b, T* out) {
  constexpr int64_t kRowBlock = 256;  // b rows per parallel work item
  const int64_t blocks = (M + kRowBlock - 1) / kRowBlock;
#pragma omp parallel for schedule(static) if (blocks > 1 && rows * K * M >= (int64_t(1) << 22))
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t j1 = std::min(M, (blk + 1) * kRowBlock);
    // x in blocks of kXRows rows, which stay in L1 while the b rows of the block (in L2) pass by; each
    // (row, column) dot is the same sum whatever the blocking (dots<TB> computes its rows alike).
    for (int64_t t0 = 0; t0 < rows; t0 += kXRows) {
      const int64_t t1 = std::min(rows, t0 + kXRows);
      for (int64_t j = blk * kRowBlock; j < j1; ++j) {
        const T* row = b + j * K;
        int64_t t = t0;
        for (; t + 4 <= t1; t += 4) dots<T, 4>(x + t * K, row, K, out + t * M + j, M);
        for (; t + 2 <= t1; t += 2) dots<T, 2>(x + t * K, row, K, out + t * M + j, M);
        for (; t < t1; ++t) dots<T, 1>(x + t * K, row, K, out + t * M + j, M);
      }
    }
  }
}

template <typename T>
void gathered_dots_impl(int64_t K, const T* x, const T* b, const int32_t* rows, int64_t count, T* out) {
  for (int64_t j = 0; j < count; ++j) {
    if (j + 2 < count) simd::prefetch_bytes(b + int64_t(rows[j + 2]) * K, K * int64_t(sizeof(T)));
    dots<T, 1>(x, b + int64_t(rows[j]) * K, K, out + j, 1);
  }
}


// Dots of TB x rows with row j of a compact table (then scaled for int8); float rows read in place
// with AVX2, otherwise widened into buf first (same arithmetic).
template <typename T, int TB>
inline void dots_q(const T* x, const RowTable<T>& b, int64_t K, int64_t j, T* buf, T* out, int64_t ldo);

// Row j of a RowTable widened exactly to T into dst[0, K); returns the factor its dots are scaled by.
template <typename T>
inline T widen_row(const RowTable<T>& b, int64_t K, int64_t j, T* dst) {
  if (b.format == RowFormat::kBf16) {
    const uint16_t* q = static_cast<const uint16_t*>(b.data) + j * K;
#pragma omp simd
    for (int64_t i = 0; i < K; ++i) dst[i] = T(__builtin_bit_cast(float, uint32_t(q[i]) << 16));
    return T(1);
  }
  const int8_t* q = static_cast<const int8_t*>(b.data) + j * K;
#pragma omp simd
  for (int64_t i = 0; i < K; ++i) dst[i] = T(q[i]);
  return T(b.scale[j]);
}

template <typename T, int TB>
inline void dots_q(const T* x, const RowTable<T>& b, int64_t K, int64_t j, T* buf, T* out, int64_t ldo) {
#if defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {
    const int64_t elem = b.format == RowFormat::kBf16 ? 2 : 1;
    const void* row = static_cast<const char*>(b.data) + j * K * elem;
    if (b.format == RowFormat::kBf16)
      dots_avx2<TB, RowFormat::kBf16>(x, row, K, out, ldo);
    else
      dots_avx2<TB, RowFormat::kInt8>(x, row, K, out, ldo);
    if (b.format == RowFormat::kInt8)
      for (int t = 0; t < TB; ++t) out[t * ldo] *= b.scale[j];
    return;
  }
#endif
  const T f = widen_row(b, K, j, buf);
  dots<T, TB>(x, buf, K, out, ldo);
  if (b.format == RowFormat::kInt8)
    for (int t = 0; t < TB; ++t) out[t * ldo] *= f;
}

// Scratch for one widened row: on the stack for the usual key widths.
template <typename T>
struct RowBuffer {
  explicit RowBuffer(int64_t K) {
    if (K > 1024) heap.resize(K);
    p = K > 1024 ? heap.data() : stack;
  }
  T stack[1024];
  std::vector<T> heap;
  T* p;
};

template <typename T>
void matmul_rows_nt_q_impl(int64_t rows, int64_t K, int64_t M, const T* x, const RowTable<T>& b, T* out) {
  if (b.format == RowFormat::kCompute) return matmul_rows_nt_impl<T>(rows, K, M, x, static_cast<const T*>(b.data), out);
  constexpr int64_t kRowBlock = 256;
  const int64_t blocks = (M + kRowBlock - 1) / kRowBlock;
  const int64_t row_bytes = b.format == RowFormat::kBf16 ? 2 * K : K;
#pragma omp parallel for schedule(static) if (blocks > 1 && rows * K * M >= (int64_t(1) << 22))
  for (int64_t blk = 0; blk < blocks; ++blk) {
    RowBuffer<T> buf(K);
    const int64_t j1 = std::min(M, (blk + 1) * kRowBlock);
    for (int64_t t0 = 0; t0 < rows; t0 += kXRows) {  // x blocks as in matmul_rows_nt_impl
      const int64_t t1 = std::min(rows, t0 + kXRows);
      for (int64_t j = blk * kRowBlock; j < j1; ++j) {
        if (j + 4 < j1) simd::prefetch_bytes(static_cast<const char*>(b.data) + (j + 4) * row_bytes, row_bytes);
        int64_t t = t0;
        for (; t + 4 <= t1; t += 4) dots_q<T, 4>(x + t * K, b, K, j, buf.p, out + t * M + j, M);
        for (; t + 2 <= t1; t += 2) dots_q<T, 2>(x + t * K, b, K, j, buf.p, out + t * M + j, M);
        for (; t < t1; ++t) dots_q<T, 1>(x + t * K, b, K, j, buf.p, out + t * M + j, M);
      }
    }
  }
}

template <typename T>
void gathered_dots_q_impl(int64_t K, const T* x, const RowTable<T>& b, const int32_t* rows, int64_t count, T* out) {
  if (b.format == RowFormat::kCompute) return gathered_dots_impl<T>(K, x, static_cast<const T*>(b.data), rows, count, out);
  RowBuffer<T> buf(K);
  const int64_t row_bytes = b.format == RowFormat::kBf16 ? 2 * K : K;
  for (int64_t j = 0; j < count; ++j) {
    if (j + 2 < count) {
      simd::prefetch_bytes(static_cast<const char*>(b.data) + int64_t(rows[j + 2]) * row_bytes, row_bytes);
      if (b.format == RowFormat::kInt8) __builtin_prefetch(b.scale + rows[j + 2], 0, 1);
    }
    dots_q<T, 1>(x, b, K, rows[j], buf.p, out + j, 1);
  }
}

}  // namespace

template <typename T>
void attend_cached_impl(int64_t S, int64_t hd, const T* q, const T* Kc, const T* Vc, T* probs, T* out) {
  for (int64_t s = 0; s < S; ++s) dots<T, 1>(q, Kc + s * hd, hd, probs + s, 1);
  T mx = probs[0];
  for (int64_t s = 1; s < S; ++s) mx = probs[s] > mx ? probs[s] : mx;
  T sum = 0;
  for (int64_t s = 0; s < S; ++s) sum += (probs[s] = std::exp(probs[s] - mx));
  const T inv = T(1) / sum;
  std::fill(out, out + hd, T(0));
  for (int64_t s = 0; s < S; ++s) simd::axpy(out, probs[s] * inv, Vc + s * hd, hd);
}

// ---- int8 rows against int8-quantised activations ------------------------------------------------

// Per-thread quantised activations of the current call.
struct Q8Rows {
  std::vector<int8_t> q;   // [rows, Kp]
  std::vector<uint8_t> a;  // [rows, Kp] |q|
  std::vector<float> s;    // [rows, Kp / kQ8Block]
};

#if defined(__AVX2__)
// Dots of TB quantised x rows with weight row w (Kp / 32 blocks; the last block of w read from `tail`
// when K is not a multiple of 32).
template <int TB>
inline void q8_dots_avx2(const Q8Rows& x, int64_t t0, int64_t K, const int8_t* w, float w_scale, float* out,
                         int64_t ldo) {
  const int64_t Kp = q8_padded(K), nb = Kp / kQ8Block;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[TB];
  for (int t = 0; t < TB; ++t) acc[t] = _mm256_setzero_ps();
  alignas(32) int8_t tail[kQ8Block] = {};
  if (K % kQ8Block) std::memcpy(tail, w + (nb - 1) * kQ8Block, size_t(K % kQ8Block));
  for (int64_t b = 0; b < nb; ++b) {
    const __m256i wv = (b + 1 < nb || K % kQ8Block == 0)
                           ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * kQ8Block))
                           : _mm256_load_si256(reinterpret_cast<const __m256i*>(tail));
    for (int t = 0; t < TB; ++t) {
      const int64_t off = (t0 + t) * Kp + b * kQ8Block;
      const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q.data() + off));
      const __m256i xa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.a.data() + off));
      const __m256i p16 = _mm256_maddubs_epi16(xa, _mm256_sign_epi8(wv, xq));  // |x| * (w * sign x), pairs
      const __m256i p32 = _mm256_madd_epi16(p16, ones);                        // lane l: positions 4l..4l+3
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p32), _mm256_set1_ps(x.s[(t0 + t) * nb + b]), acc[t]);
    }
  }
  for (int t = 0; t < TB; ++t) {
    const __m128 v = _mm_add_ps(_mm256_castps256_ps128(acc[t]), _mm256_extractf128_ps(acc[t], 1));  // a_l + a_{l+4}
    const __m128 v2 = _mm_add_ps(v, _mm_movehl_ps(v, v));                                        // (0+2), (1+3)
    out[t * ldo] = _mm_cvtss_f32(_mm_add_ss(v2, _mm_shuffle_ps(v2, v2, 1))) * w_scale;
  }
}

void matmul_rows_q8_impl(int64_t rows, int64_t K, int64_t M, const float* x, const int8_t* w, const float* w_scale,
                         float* out) {
  thread_local Q8Rows qx;
  const int64_t Kp = q8_padded(K);
  qx.q.resize(rows * Kp);
  qx.a.resize(rows * Kp);
  qx.s.resize(rows * (Kp / kQ8Block));
  quantise_q8_rows(rows, K, x, qx.q.data(), qx.s.data());
  for (int64_t i = 0; i < rows * Kp; ++i) qx.a[i] = uint8_t(qx.q[i] < 0 ? -qx.q[i] : qx.q[i]);
  constexpr int64_t kRowBlock = 256;
  const int64_t blocks = (M + kRowBlock - 1) / kRowBlock;
  const Q8Rows& xs = qx;  // read by every thread of the loop below
#pragma omp parallel for schedule(static) if (blocks > 1 && rows * K * M >= (int64_t(1) << 22))
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t j1 = std::min(M, (blk + 1) * kRowBlock);
    for (int64_t j = blk * kRowBlock; j < j1; ++j) {
      if (j + 4 < j1) simd::prefetch_bytes(w + (j + 4) * K, K);
      int64_t t = 0;
      for (; t + 4 <= rows; t += 4) q8_dots_avx2<4>(xs, t, K, w + j * K, w_scale[j], out + t * M + j, M);
      for (; t + 2 <= rows; t += 2) q8_dots_avx2<2>(xs, t, K, w + j * K, w_scale[j], out + t * M + j, M);
      for (; t < rows; ++t) q8_dots_avx2<1>(xs, t, K, w + j * K, w_scale[j], out + t * M + j, M);
    }
  }
}
#endif

template <typename T>
void fill_small_matmul(KernelTable<T>& t) {
  t.attend_cached = &attend_cached_impl<T>;
  t.matmul_rows = &matmul_rows_impl<T>;
  t.matmul_rows_nt = &matmul_rows_nt_impl<T>;
  t.gathered_dots = &gathered_dots_impl<T>;
  t.matmul_rows_nt_q = &matmul_rows_nt_q_impl<T>;
  t.gathered_dots_q = &gathered_dots_q_impl<T>;
  if constexpr (std::is_same_v<T, float>) {
#if defined(__AVX2__)
    t.matmul_rows_q8 = &matmul_rows_q8_impl;
#else
    t.matmul_rows_q8 = &matmul_rows_q8_ref;  // the reference is the portable kernel
#endif
  }
}
template void fill_small_matmul<float>(KernelTable<float>&);
template void fill_small_matmul<double>(KernelTable<double>&);

}  // namespace UM_ISA

#if UM_ISA_GENERIC
void quantise_q8_rows(int64_t rows, int64_t K, const float* x, int8_t* q, float* s) {
  const int64_t Kp = q8_padded(K), nb = Kp / kQ8Block;
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t i0 = b * kQ8Block, i1 = std::min(K, i0 + kQ8Block);
      float amax = 0;
      for (int64_t i = i0; i < i1; ++i) amax = std::max(amax, std::fabs(x[t * K + i]));
      const float inv = amax > 0 ? 127.0f / amax : 0.0f;
      s[t * nb + b] = amax / 127.0f;
      for (int64_t i = i0; i < i0 + kQ8Block; ++i)
        q[t * Kp + i] = i < i1 ? int8_t(std::nearbyint(x[t * K + i] * inv)) : int8_t(0);
    }
}

void matmul_rows_q8_ref(int64_t rows, int64_t K, int64_t M, const float* x, const int8_t* w, const float* w_scale,
                        float* out) {
  const int64_t Kp = q8_padded(K), nb = Kp / kQ8Block;
  std::vector<int8_t> q(rows * Kp);
  std::vector<float> s(rows * nb);
  quantise_q8_rows(rows, K, x, q.data(), s.data());
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t j = 0; j < M; ++j) {
      float acc[8] = {};
      for (int64_t b = 0; b < nb; ++b)
        for (int l = 0; l < 8; ++l) {
          int32_t lane = 0;
          for (int i = 0; i < 4; ++i) {
            const int64_t k = b * kQ8Block + 4 * l + i;
            if (k < K) lane += int32_t(q[t * Kp + k]) * int32_t(w[j * K + k]);
          }
          acc[l] = std::fma(float(lane), s[t * nb + b], acc[l]);
        }
      out[t * M + j] = (((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))) * w_scale[j];
    }
}

template <typename T>
void attend_cached_ref(int64_t S, int64_t hd, const T* q, const T* Kc, const T* Vc, T* probs, T* out) {
  matmul_rows_nt_ref<T>(1, hd, S, q, Kc, probs);
  T mx = probs[0];
  for (int64_t s = 1; s < S; ++s) mx = probs[s] > mx ? probs[s] : mx;
  T sum = 0;
  for (int64_t s = 0; s < S; ++s) {
    probs[s] = std::exp(probs[s] - mx);
    sum += probs[s];
  }
  const T inv = T(1) / sum;
  for (int64_t d = 0; d < hd; ++d) {
    T o = 0;
    for (int64_t s = 0; s < S; ++s) o += (probs[s] * inv) * Vc[s * hd + d];
    out[d] = o;
  }
}

template <typename T>
void matmul_rows_ref(int64_t rows, int64_t K, int64_t N, const T* x, const T* w, T* out) {
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t j = 0; j < N; ++j) {
      T s = 0;
      for (int64_t k = 0; k < K; ++k) s = std::fma(x[t * K + k], w[k * N + j], s);
      out[t * N + j] = s;
    }
}

template <typename T>
void matmul_rows_nt_ref(int64_t rows, int64_t K, int64_t M, const T* x, const T* b, T* out) {
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t j = 0; j < M; ++j) {
      T acc[kLanes] = {};
      const int64_t padded = (K + kLanes - 1) / kLanes * kLanes;  // zero products beyond K, as the kernel
      for (int64_t i = 0; i < padded; ++i)
        acc[i % kLanes] += (i < K ? x[t * K + i] : T(0)) * (i < K ? b[j * K + i] : T(0));
      out[t * M + j] = reduce16(acc);
    }
}

template <typename T>
void gathered_dots_ref(int64_t K, const T* x, const T* b, const int32_t* rows, int64_t count, T* out) {
  for (int64_t j = 0; j < count; ++j) matmul_rows_nt_ref<T>(1, K, 1, x, b + int64_t(rows[j]) * K, out + j);
}

template <typename T>
void matmul_rows_nt_q_ref(int64_t rows, int64_t K, int64_t M, const T* x, const RowTable<T>& b, T* out) {
  std::vector<T> row(K);
  for (int64_t j = 0; j < M; ++j) {
    T f = 1;
    for (int64_t i = 0; i < K; ++i) {
      if (b.format == RowFormat::kCompute) row[i] = static_cast<const T*>(b.data)[j * K + i];
      if (b.format == RowFormat::kBf16)
        row[i] = T(__builtin_bit_cast(float, uint32_t(static_cast<const uint16_t*>(b.data)[j * K + i]) << 16));
      if (b.format == RowFormat::kInt8) row[i] = T(static_cast<const int8_t*>(b.data)[j * K + i]);
    }
    if (b.format == RowFormat::kInt8) f = T(b.scale[j]);
    for (int64_t t = 0; t < rows; ++t) {
      matmul_rows_nt_ref<T>(1, K, 1, x + t * K, row.data(), out + t * M + j);
      if (b.format == RowFormat::kInt8) out[t * M + j] *= f;
    }
  }
}
template <typename T>
void widen_rows(const RowTable<T>& b, int64_t K, int64_t row0, int64_t count, T* dst) {
  for (int64_t j = 0; j < count; ++j) {
    T* d = dst + j * K;
    const int64_t r = row0 + j;
    if (b.format == RowFormat::kCompute) {
      std::memcpy(d, static_cast<const T*>(b.data) + r * K, sizeof(T) * K);
    } else if (b.format == RowFormat::kBf16) {
      const uint16_t* q = static_cast<const uint16_t*>(b.data) + r * K;
      for (int64_t i = 0; i < K; ++i) d[i] = T(__builtin_bit_cast(float, uint32_t(q[i]) << 16));
    } else {
      const int8_t* q = static_cast<const int8_t*>(b.data) + r * K;
      const T f = T(b.scale[r]);
      for (int64_t i = 0; i < K; ++i) d[i] = T(q[i]) * f;
    }
  }
}
template void widen_rows<float>(const RowTable<float>&, int64_t, int64_t, int64_t, float*);
template void widen_rows<double>(const RowTable<double>&, int64_t, int64_t, int64_t, double*);

template void matmul_rows_nt_q_ref<float>(int64_t, int64_t, int64_t, const float*, const RowTable<float>&, float*);
template void matmul_rows_nt_q_ref<double>(int64_t, int64_t, int64_t, const double*, const RowTable<double>&, double*);

template void gathered_dots_ref<float>(int64_t, const float*, const float*, const int32_t*, int64_t, float*);
template void gathered_dots_ref<double>(int64_t, const double*, const double*, const int32_t*, int64_t, double*);
template void matmul_rows_ref<float>(int64_t, int64_t, int64_t, const float*, const float*, float*);
template void matmul_rows_ref<double>(int64_t, int64_t, int64_t, const double*, const double*, double*);
template void matmul_rows_nt_ref<float>(int64_t, int64_t, int64_t, const float*, const float*, float*);
template void matmul_rows_nt_ref<double>(int64_t, int64_t, int64_t, const double*, const double*, double*);
template void attend_cached_ref<float>(int64_t, int64_t, const float*, const float*, const float*, float*, float*);
template void attend_cached_ref<double>(int64_t, int64_t, const double*, const double*, const double*, double*, double*);
#endif  // UM_ISA_GENERIC

}  // namespace ultramem::kernels
