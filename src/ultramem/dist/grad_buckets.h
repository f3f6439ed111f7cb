// Data-parallel gradient averaging for parameters every rank holds whole: the gradients are packed into
// flat buckets of at most `bucket_bytes` (one dtype per bucket), all buckets are all-reduced
// concurrently, and every gradient becomes a view of its bucket divided by the number of ranks.
#pragma once
#include <torch/types.h>

#include <cstdint>
#include <memory>
#include <vector>

namespace ultramem::dist {

class Group;

class GradientAverager {
 public:
  explicit GradientAverager(std::shared_ptr<Group> group, int64_t bucket_bytes = int64_t(25) << 20);

  // `params`: the same parameters in the same order on every rank (float32/float64). Afterwards each
  // gradient is the mean over the ranks, a rank without a gradient counting as zeros; a parameter for
  // which no rank has a gradient keeps none (so AdamW skips it as in one process). Sparse gradients are
  // made dense first. Collective.
  void average(const std::vector<torch::Tensor>& params);

  int64_t buckets_last_call() const { return buckets_; }

 private:
  std::shared_ptr<Group> group_;
  int64_t bucket_bytes_;
  int64_t buckets_ = 0;
};

}  // namespace ultramem::dist
