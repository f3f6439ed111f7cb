#include "ultramem/nn/pkm.h"

#include <torch/torch.h>

#include <cmath>

#include "ultramem/nn/dtype_guard.h"
#include "ultramem/ops/ops.h"
#include "ultramem/ops/runtime.h"

namespace ultramem::nn {

PKMImpl::PKMImpl(PKMConfig cfg) : cfg_(std::move(cfg)) {
  cfg_.validate();
  const auto& c = cfg_;
  torch::Generator gen = at::detail::createCPUGenerator(c.seed);
  const double value_std = c.value_std > 0 ? c.value_std : 1.0 / std::sqrt(double(c.Dv));
  const int64_t q_heads = c.shared_query ? 1 : c.H;
  wq = register_parameter("wq", at::normal(0.0, 1.0 / std::sqrt(double(c.D)), {c.D, q_heads * 2 * c.Dk}, gen));
  keys = register_parameter("keys", at::normal(0.0, 1.0 / std::sqrt(double(c.Dk)), {c.H, 2, c.n, c.Dk}, gen));
  values = register_parameter("values", at::normal(0.0, value_std, {c.n * c.n, c.Dv}, gen));
  if (c.Dv != c.D)
    wo = register_parameter("wo", at::normal(0.0, 1.0 / std::sqrt(double(c.Dv)), {c.Dv, c.D}, gen));
  if (c.query_norm == PKMConfig::QueryNorm::Batch)
    bn = register_module("bn", torch::nn::BatchNorm1d(q_heads * 2 * c.Dk));
  else if (c.query_norm == PKMConfig::QueryNorm::Layer)
    ln = register_module("ln", torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.Dk})));
  perm = register_buffer("perm", torch::arange(c.n * c.n, torch::kLong));
  cores = register_buffer("cores", torch::eye(2).expand({1, c.H, 2, 2}).contiguous());
  u_vec = register_buffer("u", torch::tensor({1.0f, 0.0f}).expand({c.H, 2}).contiguous());
  v_vec = register_buffer("v", torch::tensor({0.0f, 1.0f}).expand({c.H, 2}).contiguous());
}

torch::Tensor PKMImpl::forward(const torch::Tensor& x) {
  const auto& c = cfg_;
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == c.D, "PKM: input must have shape [..., D=", c.D, "], got ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == wq.scalar_type(), "PKM: input dtype ", x.scalar_type(),
              " differs from the layer's ", wq.scalar_type());
  auto lead = x.sizes().vec();
  lead.pop_back();
  const auto u = x.reshape({-1, c.D});
  const int64_t T = u.size(0);
  // Serving (ultramem::batch_invariant()): libtorch's products may round a row differently with other
  // rows around it, and this layer has no fused no-grad op yet, so a no-grad forward runs row by row.
  if (T > 1 && !at::GradMode::is_enabled() && batch_invariant()) {
    std::vector<torch::Tensor> rows;
    for (int64_t t = 0; t < T; ++t) rows.push_back(forward(u.narrow(0, t, 1)));
    lead.push_back(c.D);
    return torch::cat(rows, 0).view(lead);
  }
  auto q = u.matmul(wq);  // [T, H*2*Dk], or [T, 2*Dk] when shared
  if (bn) q = bn->forward(q);
  q = c.shared_query ? q.view({T, 1, 2, c.Dk}).expand({T, c.H, 2, c.Dk}) : q.view({T, c.H, 2, c.Dk});
  if (ln) q = ln->forward(q);
  // s[t, h, side, i] = <q[t, h, side], keys[h, side, i]>
  const auto s = torch::einsum("thsd,hsid->thsi", {q, keys});  // [T, H, 2, n]
  const auto ones = torch::ones({T, c.H, 1, c.n}, s.options());
  const auto s_row = torch::cat({s.narrow(2, 0, 1), ones}, 2);  // [T, H, 2, n] = [s_row; 1]
  const auto s_col = torch::cat({ones, s.narrow(2, 1, 1)}, 2);  // [T, H, 2, n] = [1; s_col]
  const auto dt = s.scalar_type();
  auto [scores, index] = ops::tdqkr(s_row, s_col, cores.to(dt), u_vec.to(dt), v_vec.to(dt), c.m, c.m);
  // scores: [T, H*m, 1] = s_row[i] + s_col[j]; softmax over each head's m (unless disabled).
  const auto w = c.softmax ? torch::softmax(scores.view({T, c.H, c.m}), -1).view({T, c.H * c.m, 1}) : scores;
  auto out = ops::pooled_lookup(values, index, w, perm, 1, c.sparse_value_grad);  // [T, Dv]
  if (wo.defined()) out = out.matmul(wo);
  lead.push_back(c.D);
  return out.view(lead);
}

void PKMImpl::to(torch::Dtype dtype, bool non_blocking) {
  detail::keep_integer_buffers(*this, [&] { Module::to(dtype, non_blocking); });
}
void PKMImpl::to(torch::Device device, torch::Dtype dtype, bool non_blocking) {
  detail::keep_integer_buffers(*this, [&] { Module::to(device, dtype, non_blocking); });
}
void PKMImpl::to(torch::Device device, bool non_blocking) { Module::to(device, non_blocking); }

}  // namespace ultramem::nn
