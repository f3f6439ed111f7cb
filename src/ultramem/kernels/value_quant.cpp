// Row-wise value quantisation (see value_quant.h). Not on a hot path: compiled once, no ISA builds.
#include "ultramem/kernels/value_quant.h"

#include <algorithm>
#include <cmath>

namespace ultramem::kernels {

void quantize_bf16(const float* src, int64_t n, uint16_t* dst) {
#pragma omp parallel for schedule(static) if (n > (int64_t(1) << 20))
  for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bf16(src[i]);
}

void dequantize_bf16(const uint16_t* src, int64_t n, float* dst) {
#pragma omp parallel for schedule(static) if (n > (int64_t(1) << 20))
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i]);
}

int64_t quantize_int8_rows(const float* src, int64_t rows, int64_t cols, int8_t* dst, float* scale) {
  int64_t bad = -1;
#pragma omp parallel for schedule(static) if (rows * cols > (int64_t(1) << 20))
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = src + r * cols;
    int8_t* q = dst + r * cols;
    float amax = 0.0f;
    bool finite = true;
    for (int64_t c = 0; c < cols; ++c) {
      finite = finite && std::isfinite(x[c]);
      amax = std::max(amax, std::abs(x[c]));
    }
    if (!finite) {
#pragma omp critical(ultramem_quantize_bad_row)
      if (bad < 0 || r < bad) bad = r;
      continue;
    }
    const float s = amax / 127.0f;
    scale[r] = s;
    if (s == 0.0f) {
      std::fill(q, q + cols, int8_t(0));
      continue;
    }
    for (int64_t c = 0; c < cols; ++c) {
      const float v = std::round(x[c] / s);
      q[c] = static_cast<int8_t>(std::clamp(v, -127.0f, 127.0f));
    }
  }
  return bad;
}

void dequantize_int8_rows(const int8_t* src, const float* scale, int64_t rows, int64_t cols, float* dst) {
#pragma omp parallel for schedule(static) if (rows * cols > (int64_t(1) << 20))
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[r * cols + c] = float(src[r * cols + c]) * scale[r];
}

}  // namespace ultramem::kernels
