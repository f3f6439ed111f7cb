// The storage formats of a memory layer's value table, shared by the layers that own one (UltraMem,
// Engram): float32 (trainable), bf16 and int8 with one float32 scale per row (inference only;
// ops/value_quant.h). A layer checks a table with check_value_table before installing it and converts
// its own with convert_value_table.
#pragma once
#include <torch/nn/module.h>
#include <torch/types.h>

#include <string>
#include <utility>

#include "ultramem/nn/memory_config.h"

namespace ultramem::nn {

// The format of `values` ([rows, width], contiguous, CPU: bf16, int8 or `float_type`) with `scale`
// ([rows] float32, for int8 only). Throws std::invalid_argument starting with `who` otherwise; `shape`
// names the dimensions in the message ("[N, Dv]").
ValueFormat check_value_table(const std::string& who, const std::string& shape, const torch::Tensor& values,
                              const torch::Tensor& scale, int64_t rows, int64_t width, torch::ScalarType float_type);

// `values` (a float32 table, or a bf16 one when `to` is float32) in format `to`: {table, scale} with the
// scale defined for int8 only. std::logic_error for a conversion that would need the float32 weights
// (int8 -> anything, bf16 -> int8), std::invalid_argument for values int8 cannot hold (non-finite).
std::pair<torch::Tensor, torch::Tensor> convert_value_table(const std::string& who, const torch::Tensor& values,
                                                           ValueFormat from, ValueFormat to);

// Installs table `v` of format `f` (checked by check_value_table) as `owner`'s parameter `values`: trainable
// when float32 and not read_only; an int8 table's `scale` becomes the buffer "values_scale". `format` is the
// layer's current format, updated. std::logic_error when an int8 table would be replaced by another format.
void install_value_table(torch::nn::Module& owner, torch::Tensor& values, torch::Tensor& values_scale,
                         ValueFormat& format, const std::string& who, const torch::Tensor& v,
                         const torch::Tensor& scale, ValueFormat f, bool read_only);

// values [rows, width] in `format` (scale [rows] for int8), rows `index` [K] int64 -> [K, width] in `dtype`.
torch::Tensor gather_value_rows(const torch::Tensor& values, const torch::Tensor& scale, ValueFormat format,
                                const torch::Tensor& index, torch::ScalarType dtype);

// "[2, 3]"
std::string shape_string(const torch::Tensor& t);

}  // namespace ultramem::nn
