// Turns the memory layers of a model (UltraMem and Engram) into dimension-sharded ones: every layer gets
// a ShardedValueLookup over the group and keeps only this rank's column slice of its value table.
#pragma once
#include <torch/nn/module.h>
#include <torch/types.h>

#include <memory>
#include <string>
#include <vector>

#include "ultramem/dist/sharded_value_lookup.h"

namespace ultramem::dist {

class Group;

// A parameter of which this rank holds a column slice (dim 1).
struct ShardedParameter {
  std::string name;    // name in model.named_parameters(), e.g. "memories.0.values"
  torch::Tensor param; // the parameter as held now: [N, cols.width()]
  int64_t full_cols;   // its full width (UltraMem: Dv; Engram: the row width d_e / (2*heads))
  ColumnSlice cols;    // this rank's columns [begin, end) of the full width
};

// For every nn::UltraMemImpl and nn::EngramImpl inside `model`: installs a ShardedValueLookup on `group`
// and replaces its `values` [N, w] (w: Dv, or Engram's row width) by the contiguous slice [N, w/W] this
// rank owns (same parameter object, new storage; the full table is freed). Call before building the
// optimizer. Returns the sharded parameters in model order (empty when the model has no memory table).
// Throws std::invalid_argument naming the layer when w is not divisible by the group size, or when the
// values are not a trainable float table.
std::vector<ShardedParameter> shard_memory_values(torch::nn::Module& model, const std::shared_ptr<Group>& group);

}  // namespace ultramem::dist
