// libtorch's Module::to(dtype) converts every buffer, integer ones included (Python's converts only
// floating-point tensors). Memory layers keep their integer buffers (IVE permutation, BatchNorm's
// counter) integer by wrapping the conversion in keep_integer_buffers.
#pragma once
#include <torch/nn/module.h>

#include <utility>
#include <vector>

namespace ultramem::nn::detail {

template <typename Fn>
void keep_integer_buffers(torch::nn::Module& module, Fn&& convert) {
  std::vector<std::pair<torch::Tensor, torch::Tensor>> saved;  // (buffer, copy of its value)
  for (auto& b : module.buffers(/*recurse=*/true))
    if (!at::isFloatingType(b.scalar_type())) saved.emplace_back(b, b.clone());
  convert();
  for (auto& [buffer, value] : saved) buffer.set_data(value.to(buffer.device()));
}

}  // namespace ultramem::nn::detail
