// Value tables in compact formats for inference (tensor level over kernels/value_quant.h). The tables
// are placed on transparent huge pages (huge_page_tensor.h).
#pragma once
#include <ATen/core/Tensor.h>

#include <utility>

namespace ultramem::ops {

// values: [N, Dv] float32 -> [N, Dv] bfloat16 (round to nearest even).
at::Tensor quantize_values_bf16(const at::Tensor& values);
// values: [N, Dv] float32 -> {[N, Dv] int8, [N] float32 per-row scale}: symmetric per-row int8.
// std::invalid_argument naming the first row that holds a non-finite value.
std::pair<at::Tensor, at::Tensor> quantize_values_int8(const at::Tensor& values);
// values: [N, Dv] bfloat16 -> [N, Dv] float32 (exact).
at::Tensor dequantize_values_bf16(const at::Tensor& values);

}  // namespace ultramem::ops
