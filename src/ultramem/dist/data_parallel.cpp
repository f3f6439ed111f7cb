#include "ultramem/dist/data_parallel.h"

#include <torch/torch.h>

#include <cmath>

#include "ultramem/dist/process_group.h"
#include "ultramem/dist/sharded_checkpoint.h"
#include "ultramem/train/grad_clip.h"

namespace ultramem::dist {

DataParallel::DataParallel(std::shared_ptr<Group> group, std::vector<ShardedParameter> sharded, int64_t bucket_bytes)
    : group_(std::move(group)), sharded_(std::move(sharded)), averager_(group_, bucket_bytes) {}

int64_t DataParallel::rank() const { return group_->rank(); }
int64_t DataParallel::world_size() const { return group_->size(); }

bool DataParallel::is_sharded(const torch::Tensor& p) const {
  for (const auto& s : sharded_)
    if (s.param.unsafeGetTensorImpl() == p.unsafeGetTensorImpl()) return true;
  return false;
}

void DataParallel::all_reduce_sum(std::vector<double>& values) {
  if (values.empty()) return;
  std::vector<torch::Tensor> t = {torch::tensor(values, torch::kDouble)};
  group_->all_reduce_sum(t, "scalars");
  for (size_t i = 0; i < values.size(); ++i) values[i] = t[0][static_cast<int64_t>(i)].item<double>();
}

void DataParallel::broadcast_from_rank0(std::vector<double>& values) {
  if (values.empty()) return;
  torch::Tensor t = torch::tensor(values, torch::kDouble);
  group_->broadcast(t, 0, "scalars");
  for (size_t i = 0; i < values.size(); ++i) values[i] = t[static_cast<int64_t>(i)].item<double>();
}

void DataParallel::synchronize_gradients(const std::vector<torch::Tensor>& params) {
  std::vector<torch::Tensor> whole;
  const double inv = 1.0 / static_cast<double>(group_->size());
  torch::NoGradGuard no_grad;
  for (const auto& p : params) {
    if (!is_sharded(p)) {
      whole.push_back(p);
      continue;
    }
    torch::Tensor g = p.grad();
    if (!g.defined()) continue;
    if (g.is_sparse()) {
      g._values().mul_(inv);
    } else {
      g.mul_(inv);
    }
  }
  averager_.average(whole);
}

double DataParallel::grad_norm(const std::vector<torch::Tensor>& params) {
  double whole_sq = 0, sharded_sq = 0;
  for (const auto& p : params) {
    const double n = train::grad_norm({p});  // coalesces a sparse gradient in place
    (is_sharded(p) ? sharded_sq : whole_sq) += n * n;
  }
  std::vector<double> v = {sharded_sq};
  all_reduce_sum(v);
  return std::sqrt(whole_sq + v[0]);
}

void DataParallel::save_checkpoint(const std::string& path, const torch::nn::Module& model,
                                   const nlohmann::json& model_config, const checkpoint::CheckpointWriteOptions& options) {
  save_sharded_checkpoint(*group_, sharded_, path, model, model_config, options);
}

checkpoint::Checkpoint DataParallel::read_checkpoint(const std::string& path) {
  return read_sharded_checkpoint(*group_, sharded_, path);
}

}  // namespace ultramem::dist
