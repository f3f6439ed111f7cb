// Matrix products with few rows (decode: T = 1..16 tokens), where BLAS spends more time packing
// than computing. Plain C++ on raw, contiguous, row-major buffers; compiled once per ISA. Each output
// element is summed in an order fixed by the source, so every ISA build and thread count gives the
// same bits (not the same bits as BLAS).
#pragma once
#include <cstdint>

namespace ultramem::kernels {

// out[T, N] = x[T, K] @ w[K, N]; out[t, j] is the chain acc = fma(x[t, k], w[k, j], acc) over k
// ascending from zero (one rounding per step). The chain is the same for any row count, so a row's
// result does not depend on the rows computed with it (a sequence's projections do not depend on the
// batch it decodes in). Few rows stream w; from 4 rows on, 4 x 24 register tiles (near the FMA peak).
template <typename T>
void matmul_rows(int64_t rows, int64_t K, int64_t N,
                 const T* x,   // [rows, K]
                 const T* w,   // [K, N]
                 T* out);      // [rows, N] out (overwritten)

// out[T, M] = x[T, K] @ b[M, K]^T: the dot product of every x row with every b row (key scoring).
// Each dot uses 16 partial sums in a fixed layout.
template <typename T>
void matmul_rows_nt(int64_t rows, int64_t K, int64_t M,
                    const T* x,   // [rows, K]
                    const T* b,   // [M, K]
                    T* out);      // [rows, M] out (overwritten)

// out[j] = <x, b[rows[j]]> for j < count: dot products with selected rows of a table (the exact
// scores of the rows TDQKR's filter kept). Same 16-lane layout as matmul_rows_nt.
template <typename T>
void gathered_dots(int64_t K,
                   const T* x,             // [K]
                   const T* b,             // [M, K]
                   const int32_t* rows,    // [count] rows of b
                   int64_t count,
                   T* out);                // [count] out

// A table of rows stored for inference (compact keys): the compute type, bf16 bits (the upper half of
// a float32), or int8 with one float scale per row (row j = q[j] * scale[j]).
enum class RowFormat { kCompute, kBf16, kInt8 };
template <typename T>
struct RowTable {
  RowFormat format = RowFormat::kCompute;
  const void* data = nullptr;    // [M, K] T, uint16_t (bf16 bits) or int8_t
  const float* scale = nullptr;  // [M] row scales (kInt8 only)
};

// matmul_rows_nt and gathered_dots over a RowTable: each row is widened exactly to T, dotted in the
// same 16-lane layout, and (int8) the dot multiplied by the row's scale. A kCompute table gives the
// results of matmul_rows_nt / gathered_dots.
template <typename T>
void matmul_rows_nt_q(int64_t rows, int64_t K, int64_t M,
                      const T* x,              // [rows, K]
                      const RowTable<T>& b,    // [M, K]
                      T* out);                 // [rows, M] out (overwritten)
template <typename T>
void gathered_dots_q(int64_t K,
                     const T* x,               // [K]
                     const RowTable<T>& b,     // [M, K]
                     const int32_t* rows,      // [count] rows of b
                     int64_t count,
                     T* out);                  // [count] out

// dst[count, K] = rows [row0, row0 + count) of b widened to T, int8 rows times their scale (for
// handing compact rows to a BLAS product block by block). Exact for bf16.
template <typename T>
void widen_rows(const RowTable<T>& b, int64_t K, int64_t row0, int64_t count, T* dst);

// ---- int8 rows against int8 activations (int8 dense weights at few rows) ------------------------
// Widening int8 weights to float costs more instructions than reading them (about 4 weights per
// cycle), so the int8-weight products quantise the activations too and take integer dot products.
// Each row of x is cut into blocks of kQ8Block values, K padded with zeros to a multiple of it; a block
// with amax = max|x| is stored as s = amax / 127 and q = x * (127 / amax) rounded to nearest even
// (amax = 0: s = 0, q = 0).
constexpr int64_t kQ8Block = 32;
inline int64_t q8_padded(int64_t K) { return (K + kQ8Block - 1) / kQ8Block * kQ8Block; }
void quantise_q8_rows(int64_t rows, int64_t K,
                      const float* x,  // [rows, K]
                      int8_t* q,       // [rows, q8_padded(K)] out
                      float* s);       // [rows, q8_padded(K) / kQ8Block] out

// out[t, j] = w_scale[j] * sum over blocks b of s[t, b] * (q[t, b] . w[j, b]). Each block's dot is exact
// in integers, as 8 lane sums (lane l: positions 4l..4l+3 of the block); lane l accumulates over the
// blocks acc_l = fma(float(lane sum), s[t, b], acc_l); the lanes are added as
// ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7)), then multiplied by w_scale[j]. w entries must lie
// in [-127, 127] (ops::compact_rows's int8).
void matmul_rows_q8(int64_t rows, int64_t K, int64_t M,
                    const float* x,        // [rows, K]
                    const int8_t* w,       // [M, K]
                    const float* w_scale,  // [M]
                    float* out);           // [rows, M] out (overwritten)
void matmul_rows_q8_ref(int64_t rows, int64_t K, int64_t M, const float* x, const int8_t* w, const float* w_scale,
                        float* out);

// Decode attention of one head (two few-row products and a softmax): scores[s] = <q, Kc[s]> in the
// 16-lane dot layout, p = softmax(scores) (max subtracted, exp, sum over s ascending, times 1/sum),
// out = sum over s ascending of p[s] * Vc[s]. probs is scratch.
template <typename T>
void attend_cached(int64_t S, int64_t hd,
                   const T* q,    // [hd]     query (rotated and scaled)
                   const T* Kc,   // [S, hd]  cached keys
                   const T* Vc,   // [S, hd]  cached values
                   T* probs,      // [S]      scratch
                   T* out);       // [hd]     out (overwritten)

// Scalar references (plain loops over k ascending / the same 16-lane dot layout).
template <typename T>
void matmul_rows_ref(int64_t rows, int64_t K, int64_t N, const T* x, const T* w, T* out);
template <typename T>
void matmul_rows_nt_ref(int64_t rows, int64_t K, int64_t M, const T* x, const T* b, T* out);
template <typename T>
void gathered_dots_ref(int64_t K, const T* x, const T* b, const int32_t* rows, int64_t count, T* out);
template <typename T>
void matmul_rows_nt_q_ref(int64_t rows, int64_t K, int64_t M, const T* x, const RowTable<T>& b, T* out);
template <typename T>
void attend_cached_ref(int64_t S, int64_t hd, const T* q, const T* Kc, const T* Vc, T* probs, T* out);

}  // namespace ultramem::kernels
