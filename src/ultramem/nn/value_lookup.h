// A replaceable pooled value lookup for the UltraMem layer. By default the layer calls
// ops::pooled_lookup on its whole value table; a ValueLookup installed with
// UltraMemImpl::set_value_lookup() runs instead. dist::ShardedValueLookup is one: the layer then holds
// only this process's column slice of the table and the lookup exchanges indices, scores and pooled
// slices with the other processes.
#pragma once
#include <torch/types.h>

#include <cstdint>

namespace ultramem::nn {

class ValueLookup {
 public:
  virtual ~ValueLookup() = default;

  // Same contract as ops::pooled_lookup, differentiable w.r.t. values and scores:
  //   values: the layer's `values` parameter ([N, Dv], or the slice this lookup expects)
  //   index: [T, K] int64 grid addresses   scores: [T, K, C]   perm: [E*N] int64
  // Returns the pooled values [T, E*Dv] for the full value width Dv.
  virtual torch::Tensor lookup(const torch::Tensor& values, const torch::Tensor& index, const torch::Tensor& scores,
                               const torch::Tensor& perm, int64_t E, bool sparse_grad) = 0;
};

}  // namespace ultramem::nn
