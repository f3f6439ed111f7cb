// Module::to(dtype) converts buffers too; memory layers keep their int64 index buffers int64.
#pragma once
#include <torch/types.h>

namespace ultramem::nn::detail {

template <typename Fn>
void keep_int64(torch::Tensor& buffer, Fn&& convert) {
  const auto saved = buffer.clone();
  convert();
  buffer.set_data(saved.to(buffer.device()));
}

}  // namespace ultramem::nn::detail
