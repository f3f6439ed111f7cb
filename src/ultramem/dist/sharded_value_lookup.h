// Dimension-wise sharding of a memory layer's value table (spec section 9): each of the W ranks of a
// group owns the column slice [rank*Dv/W, (rank+1)*Dv/W) of every value row, so the table, its gradient
// and its optimizer moments are split W ways. One lookup:
//
//   forward   1. all-gather every rank's token count, then its indices [T_r, K] and scores [T_r, K, C]
//                (one packed byte buffer per rank);
//             2. pool this rank's column slice for the tokens of all ranks with ops::pooled_lookup
//                ([sum T, E*Dv/W]);
//             3. all-to-all: rank j receives the slices of its own tokens from every rank and
//                assembles its [T_j, E*Dv] output.
//   backward  the reverse all-to-all brings every rank the output gradient of its slice for all
//             tokens; the local backward of step 2 gives the value-slice gradient, which stays on this
//             rank, and score gradients for all tokens, which go back to their owners by all-to-all and
//             are summed there (a reduce-scatter).
//
// A row read (Engram's gather_rows) is the same without scores: all-gather the row ids [T_r, J], read
// this rank's column slice of each row for the tokens of all ranks ([sum T, J*w/W], embedding), and
// exchange the slices as in step 3; backward returns each rank the output gradient of its slice, which
// gives its value-slice gradient (row ids have none).
//
// Multi-core scoring weights column slice c of Dv (width Dv/C) by the core-c score. A rank's slice may
// cover several cores' slices or part of one: it is cut into pieces of width gcd(Dv/W, Dv/C), each lying
// in one core's slice, and piece p is pooled with the score of its core. So any W dividing Dv works;
// W = C (or a multiple / divisor of C) maps slices onto cores exactly.
#pragma once
#include <torch/types.h>

#include <cstdint>
#include <memory>
#include <string>

#include "ultramem/nn/value_lookup.h"

namespace ultramem::dist {

class Group;

// Column slice of a value table owned by `rank` of `world`: [begin, end) of Dv.
struct ColumnSlice {
  int64_t begin = 0, end = 0;
  int64_t width() const { return end - begin; }
};
// std::invalid_argument naming `what` when Dv % world != 0.
ColumnSlice value_columns(int64_t Dv, int64_t rank, int64_t world, const std::string& what);

class ShardedValueLookup final : public nn::ValueLookup {
 public:
  // Dv, C: the layer's value width and core count (an Engram table: its row width and C = 1); `name` appears in messages and byte counters
  // ("memories.0"). Throws std::invalid_argument when Dv is not divisible by the group size or by C.
  ShardedValueLookup(std::shared_ptr<Group> group, int64_t Dv, int64_t C, std::string name);

  // values: [N, Dv/W] this rank's slice; index [T, K]; scores [T, K, C]; perm [E*N] -> [T, E*Dv].
  // Collective: every rank of the group must call it for the same layer, in the same order.
  torch::Tensor lookup(const torch::Tensor& values, const torch::Tensor& index, const torch::Tensor& scores,
                       const torch::Tensor& perm, int64_t E, bool sparse_grad) override;
  // values: [rows, w/W] this rank's slice; rows [T, J] -> [T, J*w]. Built with C = 1. Collective, like lookup.
  torch::Tensor gather_rows(const torch::Tensor& values, const torch::Tensor& rows, bool sparse_grad) override;

  const ColumnSlice& columns() const { return cols_; }
  Group& group() { return *group_; }

 private:
  std::shared_ptr<Group> group_;
  int64_t Dv_, C_;
  std::string name_;
  ColumnSlice cols_;
  torch::Tensor piece_core_;  // [P] int64: core of each piece of this rank's slice
  bool identity_pieces_;      // pieces are exactly the C cores in order (W == 1)
};

}  // namespace ultramem::dist
