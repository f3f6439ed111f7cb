#include "ultramem/ops/value_quant.h"

#include <ATen/ATen.h>

#include <stdexcept>
#include <string>

#include "ultramem/kernels/value_quant.h"
#include "ultramem/ops/huge_page_tensor.h"

namespace ultramem::ops {
namespace {

at::Tensor contiguous_2d(const at::Tensor& v, at::ScalarType want, const char* who) {
  if (!v.defined() || v.dim() != 2 || v.scalar_type() != want || !v.device().is_cpu())
    throw std::invalid_argument(std::string(who) + ": expected a CPU [N, Dv] " + c10::toString(want) + " table");
  return v.contiguous();
}

}  // namespace

at::Tensor quantize_values_bf16(const at::Tensor& values) {
  const auto src = contiguous_2d(values, at::kFloat, "quantize_values_bf16");
  const int64_t N = src.size(0), Dv = src.size(1);
  auto dst = detail::empty_on_huge_pages({N, Dv}, at::kBFloat16);
  kernels::quantize_bf16(src.data_ptr<float>(), N * Dv, reinterpret_cast<uint16_t*>(dst.data_ptr()));
  return dst;
}

std::pair<at::Tensor, at::Tensor> quantize_values_int8(const at::Tensor& values) {
  const auto src = contiguous_2d(values, at::kFloat, "quantize_values_int8");
  const int64_t N = src.size(0), Dv = src.size(1);
  auto dst = detail::empty_on_huge_pages({N, Dv}, at::kChar);
  auto scale = detail::empty_on_huge_pages({N}, at::kFloat);
  const int64_t bad =
      kernels::quantize_int8_rows(src.data_ptr<float>(), N, Dv, dst.data_ptr<int8_t>(), scale.data_ptr<float>());
  if (bad >= 0)
    throw std::invalid_argument("value row " + std::to_string(bad) +
                                " holds a non-finite value; it cannot be quantised to int8");
  return {dst, scale};
}

at::Tensor dequantize_values_bf16(const at::Tensor& values) {
  const auto src = contiguous_2d(values, at::kBFloat16, "dequantize_values_bf16");
  const int64_t N = src.size(0), Dv = src.size(1);
  auto dst = detail::empty_on_huge_pages({N, Dv}, at::kFloat);
  kernels::dequantize_bf16(reinterpret_cast<const uint16_t*>(src.data_ptr()), N * Dv, dst.data_ptr<float>());
  return dst;
}

}  // namespace ultramem::ops
