// Private to the kernels folder: small vector loops written so the compiler vectorises them for the
// ISA of the translation unit. Kernel TUs are built with -ffp-contract=off and without fast-math, so
// every ISA build computes bit-identical results (reductions use a fixed lane layout).
#pragma once
#include <cmath>
#include <cstdint>

namespace ultramem::kernels::simd {

// y[0:n] += a * x[0:n]
template <typename T>
inline void axpy(T* __restrict y, T a, const T* __restrict x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// y[0:n] = fma(a, x[0:n], y[0:n]): one rounding per element (the few-row matmul's chain).
template <typename T>
inline void fma_axpy(T* __restrict y, T a, const T* __restrict x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = std::fma(a, x[i], y[i]);
}

// y[0:n] += a * widen(x[0:n]) for values stored as bf16 bits (the upper half of a float32).
template <typename T>
inline void axpy_bf16(T* __restrict y, T a, const uint16_t* __restrict x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * T(__builtin_bit_cast(float, uint32_t(x[i]) << 16));
}

// y[0:n] += a * x[0:n] for int8 values (the caller folds the row scale into a).
template <typename T>
inline void axpy_i8(T* __restrict y, T a, const int8_t* __restrict x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * T(x[i]);
}

// <x, y> over n elements, with 8 partial sums in a fixed layout (deterministic across ISAs).
template <typename T>
inline T dot(const T* __restrict x, const T* __restrict y, int64_t n) {
  T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int l = 0; l < 8; ++l) acc[l] += x[i + l] * y[i + l];
  }
  for (int l = 0; i < n; ++i, ++l) acc[l] += x[i] * y[i];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// Prefetch `bytes` starting at p into cache, one request per 64-byte line.
inline void prefetch_bytes(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 1);
}

}  // namespace ultramem::kernels::simd
