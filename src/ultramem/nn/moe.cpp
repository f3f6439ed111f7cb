#include "ultramem/nn/moe.h"

#include <torch/torch.h>

#include "ultramem/nn/swiglu.h"
#include "ultramem/ops/moe_decode.h"

namespace ultramem::nn {

MoEImpl::MoEImpl(int64_t d_model, const MoEConfig& cfg, int64_t expert_hidden, at::Generator gen,
                 double init_std, double out_std)
    : cfg_(cfg), load_(cfg.num_experts, 0) {
  TORCH_CHECK(cfg.num_experts >= 1 && cfg.top_k >= 1 && cfg.top_k <= cfg.num_experts && expert_hidden >= 1,
              "MoE: need 1 <= top_k <= num_experts and expert_hidden >= 1");
  const int64_t K = cfg.num_experts;
  router = register_parameter("router", at::normal(0.0, init_std, {d_model, K}, gen));
  w_in = register_parameter("w_in", at::normal(0.0, init_std, {K, d_model, 2 * expert_hidden}, gen));
  w_out = register_parameter("w_out", at::normal(0.0, out_std, {K, expert_hidden, d_model}, gen));
  balance_loss_ = torch::zeros({});
}

torch::Tensor MoEImpl::forward(const torch::Tensor& x) {
  const int64_t D = router.size(0), K = cfg_.num_experts, k = cfg_.top_k;
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == D, "MoE: input must have shape [..., D=", D, "], got ", x.sizes());
  const auto xf = x.reshape({-1, D});  // [T, D]
  const int64_t T = xf.size(0);
  if (!at::GradMode::is_enabled()) {
    // No grad: the fused op (ops/moe_decode.h), the same routing and experts without autograd.
    ops::MoeDecodeStats st;
    auto out = ops::moe_decode(xf.contiguous(), router, w_in_c_.get(w_in), w_out_c_.get(w_out), k, &st);
    const int64_t* cnt = st.counts.data_ptr<int64_t>();
    for (int64_t e = 0; e < K; ++e) load_[e] += cnt[e];
    balance_loss_ = T > 0 ? (st.counts.to(st.mean_probs.scalar_type()) / double(T * k) * st.mean_probs).sum() *
                                (cfg_.balance_coef * double(K))
                          : torch::zeros({}, router.options());
    return out.view(x.sizes());
  }
  const auto probs = torch::softmax(xf.matmul(router), -1);  // [T, K]
  auto [top_w, top_e] = probs.topk(k, -1);                   // [T, k] each
  // Renormalise the kept weights (k > 1). With k == 1 the raw probability is kept: renormalising
  // would make it the constant 1 and cut the router off from the LM loss.
  if (k > 1) top_w = top_w / top_w.sum(-1, /*keepdim=*/true);

  // Group the T*k assignments by expert: a stable sort keeps token order inside each expert.
  const auto flat_e = top_e.reshape({-1});                                          // [T*k]
  const auto order = std::get<1>(torch::sort(flat_e, c10::optional<bool>(true), /*dim=*/0, /*descending=*/false));  // [T*k]
  const auto token = order.div(k, "floor");                                         // [T*k] token of each
  const auto weight = top_w.reshape({-1}).index_select(0, order);                   // [T*k]
  const auto counts = torch::bincount(flat_e, {}, K);                               // [K] int64
  const int64_t* cnt = counts.data_ptr<int64_t>();
  const std::vector<int64_t> sizes(cnt, cnt + K);
  // split / unbind rather than per-expert narrow / select: their backward assembles the gradient
  // once instead of zero-filling a full-size tensor per expert.
  const auto xs = xf.index_select(0, token).split_with_sizes(sizes, 0);  // K x [cnt_e, D]
  const auto w_in_e = w_in.unbind(0), w_out_e = w_out.unbind(0);
  std::vector<torch::Tensor> ys;
  for (int64_t e = 0; e < K; ++e) {
    load_[e] += cnt[e];
    if (cnt[e] > 0) ys.push_back(swiglu(xs[e], w_in_e[e], w_out_e[e]));  // [cnt_e, D]
  }
  torch::Tensor out = torch::zeros_like(xf);
  if (!ys.empty()) out = out.index_add(0, token, torch::cat(ys, 0) * weight.unsqueeze(1));  // [T, D]

  // f_e: fraction of the top-k assignments routed to e (no gradient); P_e: mean router probability.
  if (T > 0) {
    const auto f = counts.to(probs.scalar_type()) / double(T * k);  // [K]
    balance_loss_ = (f * probs.mean(0)).sum() * (cfg_.balance_coef * double(K));
  } else {
    balance_loss_ = torch::zeros({}, probs.options());
  }
  return out.view(x.sizes());
}

}  // namespace ultramem::nn
