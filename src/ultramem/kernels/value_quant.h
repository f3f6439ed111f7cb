// Row-wise quantisation of value tables for inference (bf16, and int8 with a per-row scale).
//
// bf16: the upper 16 bits of an IEEE float32, rounded to nearest even. For a finite x whose bf16
//   rounding is finite and normal, |x - bf16(x)| <= 2^-8 |x|. NaN stays NaN; +-inf stay infinite.
// int8: symmetric per row, value = q * scale with scale = max|row| / 127 and q = round(x / scale)
//   (ties away from zero) in [-127, 127]; |x - q * scale| <= scale / 2 (plus float rounding of the
//   division). An all-zero row gets scale 0 and q = 0. Rows with a non-finite entry are rejected.
#pragma once
#include <cstdint>
#include <cstring>

namespace ultramem::kernels {

inline uint16_t float_to_bf16(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  if ((b & 0x7f800000u) == 0x7f800000u && (b & 0x007fffffu) != 0)
    return static_cast<uint16_t>((b >> 16) | 0x0040u);  // NaN: keep it a (quiet) NaN
  const uint32_t rounding = 0x7fffu + ((b >> 16) & 1u);  // round to nearest, ties to even
  return static_cast<uint16_t>((b + rounding) >> 16);
}

inline float bf16_to_float(uint16_t h) {
  const uint32_t b = uint32_t(h) << 16;
  float x;
  std::memcpy(&x, &b, 4);
  return x;
}

// dst[i] = bf16(src[i]) for i < n.
void quantize_bf16(const float* src, int64_t n, uint16_t* dst);
// dst[i] = float(src[i]) for i < n (exact).
void dequantize_bf16(const uint16_t* src, int64_t n, float* dst);

// Quantises rows x cols values row by row. Returns -1 on success, else the first row holding a
// non-finite value (nothing is guaranteed about dst/scale then).
int64_t quantize_int8_rows(const float* src,   // [rows, cols]
                           int64_t rows, int64_t cols,
                           int8_t* dst,        // [rows, cols] out
                           float* scale);      // [rows] out
// dst[r, c] = src[r, c] * scale[r].
void dequantize_int8_rows(const int8_t* src,   // [rows, cols]
                          const float* scale,  // [rows]
                          int64_t rows, int64_t cols,
                          float* dst);         // [rows, cols] out

}  // namespace ultramem::kernels
