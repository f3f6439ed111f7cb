#include "ultramem/dist/grad_buckets.h"

#include <torch/torch.h>

#include <stdexcept>

#include "ultramem/dist/process_group.h"

namespace ultramem::dist {

GradientAverager::GradientAverager(std::shared_ptr<Group> group, int64_t bucket_bytes)
    : group_(std::move(group)), bucket_bytes_(bucket_bytes) {
  if (!group_) throw std::invalid_argument("GradientAverager: group is null");
  if (bucket_bytes_ < 1) throw std::invalid_argument("GradientAverager: bucket_bytes must be >= 1");
}

void GradientAverager::average(const std::vector<torch::Tensor>& params) {
  for (const auto& p : params)
    if (p.scalar_type() != torch::kFloat && p.scalar_type() != torch::kDouble)
      throw std::invalid_argument("GradientAverager: parameters must be float32 or float64");
  torch::NoGradGuard no_grad;
  const int64_t P = static_cast<int64_t>(params.size());
  // Which ranks have a gradient of each parameter, summed with the buckets.
  torch::Tensor has_grad = torch::zeros({P}, torch::kDouble);
  struct Bucket {
    torch::Tensor flat;             // [numel] the gradients back to back
    std::vector<int64_t> members;   // parameter indices
    std::vector<int64_t> offsets;   // their offsets in flat
  };
  std::vector<Bucket> buckets;
  auto* hp = has_grad.data_ptr<double>();
  // Group by dtype, in parameter order, each bucket up to bucket_bytes_.
  for (const auto dtype : {torch::kFloat, torch::kDouble}) {
    std::vector<int64_t> current;
    int64_t bytes = 0, numel = 0;
    auto flush = [&] {
      if (current.empty()) return;
      Bucket b;
      b.flat = torch::empty({numel}, torch::TensorOptions().dtype(dtype));
      int64_t off = 0;
      for (int64_t i : current) {
        const auto& p = params[static_cast<size_t>(i)];
        torch::Tensor g = p.grad();
        auto dst = b.flat.narrow(0, off, p.numel());
        if (g.defined()) {
          dst.copy_((g.is_sparse() ? g.to_dense() : g).reshape({-1}));
        } else {
          dst.zero_();
        }
        b.members.push_back(i);
        b.offsets.push_back(off);
        off += p.numel();
      }
      buckets.push_back(std::move(b));
      current.clear();
      bytes = numel = 0;
    };
    for (int64_t i = 0; i < P; ++i) {
      const auto& p = params[static_cast<size_t>(i)];
      if (p.scalar_type() != dtype) continue;
      if (p.grad().defined()) hp[i] = 1.0;
      const int64_t b = p.numel() * static_cast<int64_t>(p.element_size());
      if (!current.empty() && bytes + b > bucket_bytes_) flush();
      current.push_back(i);
      bytes += b;
      numel += p.numel();
    }
    flush();
  }
  std::vector<torch::Tensor> send = {has_grad};
  for (auto& b : buckets) send.push_back(b.flat);
  group_->all_reduce_sum(send, "grads.allreduce");
  const double inv = 1.0 / static_cast<double>(group_->size());
  for (auto& b : buckets) {
    b.flat.mul_(inv);
    for (size_t k = 0; k < b.members.size(); ++k) {
      const int64_t i = b.members[k];
      torch::Tensor p = params[static_cast<size_t>(i)];
      if (hp[i] == 0.0) continue;  // no rank has a gradient
      p.mutable_grad() = b.flat.narrow(0, b.offsets[k], p.numel()).view(p.sizes());
    }
  }
  buckets_ = static_cast<int64_t>(buckets.size());
}

}  // namespace ultramem::dist
