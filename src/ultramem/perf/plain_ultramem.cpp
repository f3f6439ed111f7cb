#include "ultramem/perf/plain_ultramem.h"

#include <torch/torch.h>

#include "ultramem/nn/ultramem.h"

namespace ultramem::perf::plain {
namespace {

// Normalisation over the last dim, as nn::UltraMem (eps 1e-6), scaled.
torch::Tensor norm(nn::NormKind kind, const torch::Tensor& x, const torch::Tensor& scale) {
  constexpr double eps = 1e-6;
  if (kind == nn::NormKind::RMS) return x * torch::rsqrt(x.pow(2).mean(-1, true) + eps) * scale;
  const auto mean = x.mean(-1, true);
  const auto var = (x - mean).pow(2).mean(-1, true);
  return (x - mean) * torch::rsqrt(var + eps) * scale;
}

}  // namespace

torch::Tensor pooled_lookup(const torch::Tensor& values, const torch::Tensor& index, const torch::Tensor& scores,
                            const torch::Tensor& perm, int64_t E, bool sparse_grad) {
  const int64_t T = index.size(0), K = index.size(1), N = values.size(0), Dv = values.size(1), C = scores.size(2);
  const auto v = perm.index_select(0, index.reshape({-1}));  // [T*K] virtual ids
  const auto row = v.remainder(N);                           // [T*K]
  const auto grp = v.div(N, "floor");                        // [T*K]
  const auto tok = torch::arange(T, index.options()).repeat_interleave(K);
  const auto dst = tok * E + grp;  // [T*K] destination row of [T*E, Dv]
  const auto gathered =
      sparse_grad ? at::embedding(values, row, -1, false, /*sparse=*/true) : values.index_select(0, row);  // [T*K, Dv]
  const auto w = (gathered.view({T * K, C, Dv / C}) * scores.reshape({T * K, C, 1})).view({T * K, Dv});
  return torch::zeros({T * E, Dv}, values.options()).index_add(0, dst, w).view({T, E * Dv});
}

std::tuple<torch::Tensor, torch::Tensor> tdqkr(const torch::Tensor& s_row, const torch::Tensor& s_col,
                                               const torch::Tensor& cores, const torch::Tensor& u,
                                               const torch::Tensor& v, int64_t m1, int64_t m) {
  const int64_t T = s_row.size(0), H = s_row.size(1), r = s_row.size(2), n = s_row.size(3), C = cores.size(0);
  const auto f_row = torch::einsum("thrn,hr->thn", {s_row, u});  // [T, H, n]
  const auto f_col = torch::einsum("thrn,hr->thn", {s_col, v});
  const auto ir = std::get<1>(f_row.topk(m1, -1));  // [T, H, m1]
  const auto ic = std::get<1>(f_col.topk(m1, -1));
  const auto R = s_row.gather(3, ir.unsqueeze(2).expand({T, H, r, m1}));         // [T, H, r, m1]
  const auto Cc = s_col.gather(3, ic.unsqueeze(2).expand({T, H, r, m1}));        // [T, H, r, m1]
  const auto Gc = torch::einsum("thax,chab,thby->thcxy", {R, cores, Cc});        // [T, H, C, m1, m1]
  const auto pos = std::get<1>(Gc.sum(2).reshape({T, H, m1 * m1}).topk(m, -1));  // [T, H, m]
  const auto x = pos.div(m1, "floor"), y = pos.remainder(m1);
  const auto index = ir.gather(2, x) * n + ic.gather(2, y);                                         // [T, H, m]
  const auto sc = Gc.reshape({T, H, C, m1 * m1}).gather(3, pos.unsqueeze(2).expand({T, H, C, m}));  // [T, H, C, m]
  return {sc.permute({0, 1, 3, 2}).reshape({T, H * m, C}), index.reshape({T, H * m})};
}

NormalisedKeys normalise_keys(const nn::UltraMemImpl& layer) {
  const auto kind = layer.config().qk_norm;
  const auto kt = layer.keys.transpose(3, 4);  // [H, 2, n, r, Dk]
  return {norm(kind, kt.select(1, 0), layer.k_scale[0]), norm(kind, kt.select(1, 1), layer.k_scale[1])};
}

std::tuple<torch::Tensor, torch::Tensor> query(const nn::UltraMemImpl& layer, const torch::Tensor& x) {
  const auto& c = layer.config();
  const auto q = x.matmul(layer.wq);  // [T, 2*Dk]
  return {norm(c.qk_norm, q.narrow(1, 0, c.Dk), layer.q_scale[0]),
          norm(c.qk_norm, q.narrow(1, c.Dk, c.Dk), layer.q_scale[1])};
}

torch::Tensor side_scores(const torch::Tensor& q, const torch::Tensor& kn) {
  const int64_t H = kn.size(0), n = kn.size(1), r = kn.size(2), Dk = kn.size(3);
  const auto k2 = kn.permute({0, 2, 1, 3}).reshape({H * r * n, Dk});  // [(H r n), Dk]
  return q.matmul(k2.t()).view({q.size(0), H, r, n});
}

torch::Tensor ultramem_forward(const nn::UltraMemImpl& layer, const torch::Tensor& x, const NormalisedKeys* keys) {
  const auto& c = layer.config();
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == c.D, "plain::ultramem_forward: input must have shape [..., D=", c.D,
              "], got ", x.sizes());
  TORCH_CHECK(c.filter == nn::RetrievalFilter::kRank1,
              "plain::ultramem_forward: the plain-libtorch baseline has the paper's rank-1 filter only, the layer uses ",
              nn::to_string(c.filter));
  auto lead = x.sizes().vec();
  lead.pop_back();
  const auto u = x.reshape({-1, c.D});  // [T, D]
  const NormalisedKeys kn = keys ? *keys : normalise_keys(layer);
  const auto [q_row, q_col] = query(layer, u);
  const auto s_row = side_scores(q_row, kn.row), s_col = side_scores(q_col, kn.col);  // [T, H, r, n]
  const auto dt = s_row.scalar_type();
  const auto [scores, index] =
      tdqkr(s_row, s_col, layer.cores, layer.u_vec.to(dt), layer.v_vec.to(dt), c.first_stage_m(), c.m);
  const auto pooled = pooled_lookup(layer.values, index, scores, layer.perm, c.E, c.sparse_value_grad);  // [T, E*Dv]
  lead.push_back(c.D);
  return pooled.matmul(layer.wo).view(lead);
}

}  // namespace ultramem::perf::plain
