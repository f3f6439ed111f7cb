#include "ultramem/nn/attention.h"

#include <torch/torch.h>

#include <cmath>
#include <limits>

#include "ultramem/ops/block_decode.h"

namespace ultramem::nn {

CausalSelfAttentionImpl::CausalSelfAttentionImpl(const AttentionOptions& o, at::Generator gen)
    : o_(o), head_dim_(o.d_model / o.n_heads) {
  TORCH_CHECK(o.n_heads >= 1 && o.d_model % o.n_heads == 0 && head_dim_ % 2 == 0,
              "CausalSelfAttention: d_model ", o.d_model, " must split into n_heads ", o.n_heads,
              " heads of even size");
  wqkv = register_parameter("wqkv", at::normal(0.0, o.init_std, {o.d_model, 3 * o.d_model}, gen));
  wo = register_parameter("wo", at::normal(0.0, o.out_std, {o.d_model, o.d_model}, gen));
  // Rotary angles: position p, frequency i -> p * theta^(-2i / head_dim).
  const int64_t half = head_dim_ / 2;
  const auto inv_freq =
      torch::pow(o.rope_theta, -torch::arange(0, half, torch::kDouble) * (2.0 / double(head_dim_)));  // [half]
  const auto angles = torch::arange(0, o.max_seq_len, torch::kDouble).unsqueeze(1) * inv_freq.unsqueeze(0);
  cos_ = angles.cos();
  sin_ = angles.sin();
}

torch::Tensor CausalSelfAttentionImpl::rope(const torch::Tensor& x, int64_t pos0) const {
  // Rotates the pairs (x[i], x[i + half]) ("half-split" layout).
  const int64_t T = x.size(2);
  const auto cos = cos_.narrow(0, pos0, T).to(x.scalar_type());  // [T, half]
  const auto sin = sin_.narrow(0, pos0, T).to(x.scalar_type());
  const auto halves = x.chunk(2, -1);  // chunk, not narrow: one split in the backward
  const auto &x1 = halves[0], &x2 = halves[1];
  return torch::cat({x1 * cos - x2 * sin, x1 * sin + x2 * cos}, -1);
}

torch::Tensor CausalSelfAttentionImpl::forward(const torch::Tensor& x, int64_t pos0, torch::Tensor* cache_k,
                                               torch::Tensor* cache_v) {
  const int64_t B = x.size(0), T = x.size(1), D = o_.d_model, nh = o_.n_heads, hd = head_dim_;
  TORCH_CHECK(pos0 >= 0 && pos0 + T <= o_.max_seq_len, "CausalSelfAttention: positions [", pos0, ", ",
              pos0 + T, ") exceed max_seq_len ", o_.max_seq_len);
  TORCH_CHECK(cache_k != nullptr || pos0 == 0, "CausalSelfAttention: pos0 > 0 needs a cache");
  TORCH_CHECK(cache_k == nullptr || pos0 + T <= cache_k->size(2), "CausalSelfAttention: cache holds ",
              cache_k ? cache_k->size(2) : 0, " positions, need ", pos0 + T);
  // Decode (one new token per sequence, no grad): the no-grad op, without per-op overhead.
  if (cache_k != nullptr && T == 1 && !(o_.dropout > 0 && is_training()) && ops::no_grad_op_applies(x, wqkv) &&
      cache_k->scalar_type() == x.scalar_type() && cache_k->is_contiguous() && cache_v->is_contiguous()) {
    return ops::attention_decode(x.reshape({B, D}), wqkv_c_.get(wqkv), wo_c_.get(wo), cos_, sin_, *cache_k, *cache_v, pos0)
        .view({B, 1, D});
  }
  // unbind rather than qkv[i]: its backward stacks once instead of zero-filling per select.
  const auto qkv = x.matmul(wqkv).view({B, T, 3, nh, hd}).permute({2, 0, 3, 1, 4}).unbind(0);  // 3 x [B, nh, T, hd]
  const auto q = rope(qkv[0], pos0) * (1.0 / std::sqrt(double(hd)));  // [B, nh, T, hd]
  auto k = rope(qkv[1], pos0);                                         // [B, nh, T, hd]
  auto v = qkv[2];                                                     // [B, nh, T, hd]
  if (cache_k != nullptr) {
    cache_k->narrow(2, pos0, T).copy_(k);
    cache_v->narrow(2, pos0, T).copy_(v);
    k = cache_k->narrow(2, 0, pos0 + T);
    v = cache_v->narrow(2, 0, pos0 + T);
  }
  const int64_t S = pos0 + T;
  auto scores = q.matmul(k.transpose(2, 3));  // [B, nh, T, S]
  if (T > 1) {
    // Query i (position pos0 + i) sees keys j <= pos0 + i.
    const auto opts = torch::TensorOptions().dtype(torch::kLong);
    const auto future = torch::arange(S, opts).unsqueeze(0) > (torch::arange(T, opts) + pos0).unsqueeze(1);  // [T, S]
    scores = scores.masked_fill(future, -std::numeric_limits<double>::infinity());
  }
  auto probs = torch::softmax(scores, -1);
  if (o_.dropout > 0) probs = torch::dropout(probs, o_.dropout, is_training());
  const auto out = probs.matmul(v).transpose(1, 2).reshape({B, T, D});  // [B, T, D]
  return out.matmul(wo);
}

torch::Tensor CausalSelfAttentionImpl::forward_slots(const torch::Tensor& x, const std::vector<int64_t>& slots,
                                                     const std::vector<int64_t>& positions, torch::Tensor& cache_k,
                                                     torch::Tensor& cache_v) {
  const int64_t B = x.size(0), D = o_.d_model;
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1, "CausalSelfAttention::forward_slots: x must be [B, 1, D]");
  TORCH_CHECK(int64_t(slots.size()) == B && int64_t(positions.size()) == B,
              "CausalSelfAttention::forward_slots: slots and positions must hold B = ", B, " entries");
  if (!(o_.dropout > 0 && is_training()) && ops::no_grad_op_applies(x, wqkv) &&
      cache_k.scalar_type() == x.scalar_type() && cache_k.is_contiguous() && cache_v.is_contiguous()) {
    return ops::attention_decode(x.reshape({B, D}), wqkv_c_.get(wqkv), wo_c_.get(wo), cos_, sin_, cache_k, cache_v,
                                 slots, positions)
        .view({B, 1, D});
  }
  std::vector<torch::Tensor> rows;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(slots[b] >= 0 && slots[b] < cache_k.size(0), "CausalSelfAttention::forward_slots: slot ", slots[b],
                " outside the cache's ", cache_k.size(0), " rows");
    auto k = cache_k.narrow(0, slots[b], 1), v = cache_v.narrow(0, slots[b], 1);
    rows.push_back(forward(x.narrow(0, b, 1), positions[b], &k, &v));
  }
  return torch::cat(rows, 0);
}

}  // namespace ultramem::nn
