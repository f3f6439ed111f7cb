// train::ParallelContext over c10d: data parallelism for every parameter the ranks hold whole
// (bucketed gradient averaging), and dimension-wise sharding for the memory value tables (their
// gradients and optimizer moments stay on the rank owning the columns).
#pragma once
#include <memory>
#include <vector>

#include "ultramem/dist/grad_buckets.h"
#include "ultramem/dist/memory_sharding.h"
#include "ultramem/train/parallel.h"

namespace ultramem::dist {

class Group;

class DataParallel final : public train::ParallelContext {
 public:
  // `sharded`: what shard_memory_values() returned for this model (may be empty: pure data parallel).
  DataParallel(std::shared_ptr<Group> group, std::vector<ShardedParameter> sharded,
               int64_t bucket_bytes = int64_t(25) << 20);

  int64_t rank() const override;
  int64_t world_size() const override;
  void all_reduce_sum(std::vector<double>& values) override;
  void broadcast_from_rank0(std::vector<double>& values) override;
  // Whole parameters: averaged over the ranks (GradientAverager). Sharded parameters: their gradient
  // already sums every rank's tokens (the lookup brought them all to the owner), so it is divided by
  // the number of ranks to match the mean of the ranks' losses.
  void synchronize_gradients(const std::vector<torch::Tensor>& params) override;
  // sqrt(sum of squared norms of whole gradients (the same on every rank, counted once) + all-reduced
  // sum of the squared norms of the sharded slices).
  double grad_norm(const std::vector<torch::Tensor>& params) override;
  void save_checkpoint(const std::string& path, const torch::nn::Module& model, const nlohmann::json& model_config,
                       const checkpoint::CheckpointWriteOptions& options) override;
  checkpoint::Checkpoint read_checkpoint(const std::string& path) override;

  Group& group() { return *group_; }
  const std::vector<ShardedParameter>& sharded() const { return sharded_; }

 private:
  bool is_sharded(const torch::Tensor& p) const;

  std::shared_ptr<Group> group_;
  std::vector<ShardedParameter> sharded_;
  GradientAverager averager_;
};

}  // namespace ultramem::dist
