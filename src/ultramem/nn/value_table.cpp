#include "ultramem/nn/value_table.h"

#include <torch/torch.h>

#include <stdexcept>

#include "ultramem/ops/value_quant.h"

namespace ultramem::nn {

std::string shape_string(const torch::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

ValueFormat check_value_table(const std::string& who, const std::string& shape, const torch::Tensor& v,
                              const torch::Tensor& scale, int64_t rows, int64_t width, torch::ScalarType float_type) {
  if (!v.defined() || v.dim() != 2 || v.size(0) != rows || v.size(1) != width || !v.is_contiguous() ||
      !v.device().is_cpu())
    throw std::invalid_argument(who + "values must be a contiguous CPU tensor " + shape + " = [" +
                                std::to_string(rows) + ", " + std::to_string(width) + "], got " +
                                (v.defined() ? shape_string(v) : "undefined"));
  ValueFormat f;
  if (v.scalar_type() == torch::kBFloat16) {
    f = ValueFormat::kBFloat16;
  } else if (v.scalar_type() == torch::kChar) {
    f = ValueFormat::kInt8;
  } else if (v.scalar_type() == float_type) {
    f = ValueFormat::kFloat32;
  } else {
    throw std::invalid_argument(who + "values must be bfloat16, int8 or the layer's " + c10::toString(float_type) +
                                ", got " + c10::toString(v.scalar_type()));
  }
  if (f == ValueFormat::kInt8) {
    if (!scale.defined() || scale.dim() != 1 || scale.size(0) != rows || scale.scalar_type() != torch::kFloat ||
        !scale.is_contiguous() || !scale.device().is_cpu())
      throw std::invalid_argument(who + "int8 values need a contiguous float32 CPU scale [" +
                                  shape.substr(1, shape.find(',') - 1) + "] = [" + std::to_string(rows) +
                                  "], got " +
                                  (scale.defined() ? shape_string(scale) + " " + c10::toString(scale.scalar_type())
                                                   : std::string("none")));
  } else if (scale.defined()) {
    throw std::invalid_argument(who + "a row scale belongs to int8 values only");
  }
  return f;
}

std::pair<torch::Tensor, torch::Tensor> convert_value_table(const std::string& who, const torch::Tensor& values,
                                                           ValueFormat from, ValueFormat to) {
  if (from == ValueFormat::kInt8 || (from == ValueFormat::kBFloat16 && to == ValueFormat::kInt8))
    throw std::logic_error(who + "cannot convert a " + to_string(from) + " value table to " + to_string(to) +
                           "; quantise from the float32 weights instead");
  if (from == ValueFormat::kFloat32 && values.scalar_type() != torch::kFloat)
    throw std::logic_error(who + "quantising needs a float32 value table, the layer's is " +
                           c10::toString(values.scalar_type()));
  torch::NoGradGuard no_grad;
  const torch::Tensor src = values.detach();
  if (to == ValueFormat::kBFloat16) return {ops::quantize_values_bf16(src), torch::Tensor()};
  if (to == ValueFormat::kInt8) {
    try {
      return ops::quantize_values_int8(src);
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument(who + e.what());
    }
  }
  return {ops::dequantize_values_bf16(src), torch::Tensor()};  // bf16 -> float32, exact
}

void install_value_table(torch::nn::Module& owner, torch::Tensor& values, torch::Tensor& values_scale,
                         ValueFormat& format, const std::string& who, const torch::Tensor& v,
                         const torch::Tensor& scale, ValueFormat f, bool read_only) {
  if (format == ValueFormat::kInt8 && f != ValueFormat::kInt8)
    throw std::logic_error(who + "an int8 value table cannot be replaced by a " + to_string(f) +
                           " one (its scale buffer is part of the module); build a new layer");
  torch::NoGradGuard no_grad;
  values.mutable_grad() = torch::Tensor();
  values.set_requires_grad(false);
  values.set_data(v);
  values.set_requires_grad(f == ValueFormat::kFloat32 && !read_only);
  if (f == ValueFormat::kInt8) {
    if (values_scale.defined())
      values_scale.set_data(scale);
    else
      values_scale = owner.register_buffer("values_scale", scale);
  }
  format = f;
}

torch::Tensor gather_value_rows(const torch::Tensor& values, const torch::Tensor& scale, ValueFormat format,
                                const torch::Tensor& index, torch::ScalarType dtype) {
  torch::Tensor rows = values.index_select(0, index).to(dtype);  // [K, width]
  if (format == ValueFormat::kInt8) rows = rows * scale.index_select(0, index).to(dtype).unsqueeze(1);
  return rows;
}

}  // namespace ultramem::nn
