// A replaceable value-table read for the memory layers. By default UltraMem calls ops::pooled_lookup
// and Engram torch::embedding on the whole table; a ValueLookup installed with set_value_lookup() runs
// instead. dist::ShardedValueLookup is one: the layer then holds only this process's column slice of
// the table and the lookup exchanges indices (and scores) and the read slices with the other processes.
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

  // The read of a table addressed by row ids (Engram), differentiable w.r.t. values:
  //   values: the layer's `values` parameter ([rows, w], or the slice this lookup expects)
  //   rows: [T, J] int64 row ids
  // Returns the J rows of each token side by side, [T, J*w], for the full row width w.
  virtual torch::Tensor gather_rows(const torch::Tensor& values, const torch::Tensor& rows, bool sparse_grad) = 0;
};

}  // namespace ultramem::nn
