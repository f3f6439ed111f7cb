// Matrix products with few rows (decode: T = 1..16 tokens), where BLAS spends more time packing
// than computing. Plain C++ on raw, contiguous, row-major buffers; compiled once per ISA. Each output
// element is summed in an order fixed by the source, so every ISA build and thread count gives the
// same bits (not the same bits as BLAS).
#pragma once
#include <cstdint>

namespace ultramem::kernels {

// out[T, N] = x[T, K] @ w[K, N]; out[t, j] = sum over k ascending of x[t, k] * w[k, j].
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

// Scalar references (plain loops over k ascending / the same 16-lane dot layout).
template <typename T>
void matmul_rows_ref(int64_t rows, int64_t K, int64_t N, const T* x, const T* w, T* out);
template <typename T>
void matmul_rows_nt_ref(int64_t rows, int64_t K, int64_t M, const T* x, const T* b, T* out);
template <typename T>
void gathered_dots_ref(int64_t K, const T* x, const T* b, const int32_t* rows, int64_t count, T* out);

}  // namespace ultramem::kernels
