// Autograd function for TDQKR retrieval: forward and backward over the kernels in kernels/tdqkr.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/autograd.h>

#include "ultramem/kernels/tdqkr.h"
#include "ultramem/ops/check.h"
#include "ultramem/ops/ops.h"

namespace ultramem::ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

kernels::TdqkrShape shape_of(const at::Tensor& s_row, const at::Tensor& cores, int64_t m_first,
                             int64_t m, int64_t m_neg, int64_t filter_rank = 0) {
  kernels::TdqkrShape s;
  s.T = s_row.size(0);
  s.H = s_row.size(1);
  s.r = s_row.size(2);
  s.n = s_row.size(3);
  s.C = cores.size(0);
  s.m_first = m_first;
  s.m = m;
  s.m_neg = m_neg;
  s.filter_rank = filter_rank;
  return s;
}

// The rank-R filter is selected by u, v of shape [H, R, r]; [H, r] is the signed rank-1 filter.
int64_t filter_rank_of(const at::Tensor& u) { return u.dim() == 3 ? u.size(1) : 0; }

void check_args(const at::Tensor& s_row, const at::Tensor& s_col, const at::Tensor& cores,
                const at::Tensor& u, const at::Tensor& v, int64_t m_first, int64_t m, int64_t m_neg) {
  using detail::check_sizes;
  using detail::check_tensor;
  const auto fp = {at::kFloat, at::kDouble};
  check_tensor(s_row, "ultramem::tdqkr: s_row", 4, fp);
  const int64_t T = s_row.size(0), H = s_row.size(1), r = s_row.size(2), n = s_row.size(3);
  check_tensor(s_col, "ultramem::tdqkr: s_col", 4, fp);
  check_sizes(s_col, "ultramem::tdqkr: s_col", {T, H, r, n}, "[T, H, r, n] equal to s_row's");
  check_tensor(cores, "ultramem::tdqkr: cores", 4, fp);
  TORCH_CHECK(cores.size(0) >= 1, "ultramem::tdqkr: cores must have C >= 1 cores, got shape ",
              detail::shape_str(cores));
  check_sizes(cores, "ultramem::tdqkr: cores", {cores.size(0), H, r, r}, "[C, H, r, r]");
  if (u.dim() == 3) {  // rank-R filter
    const int64_t R = u.size(1);
    TORCH_CHECK(R >= 1 && R <= r, "ultramem::tdqkr: filter_rank R = u.size(1) must be in [1, r = ", r,
                "] (u, v: [H, R, r]), got u of shape ", detail::shape_str(u));
    check_tensor(u, "ultramem::tdqkr: u", 3, fp);
    check_sizes(u, "ultramem::tdqkr: u", {H, R, r}, "[H, R, r]");
    check_tensor(v, "ultramem::tdqkr: v", 3, fp);
    check_sizes(v, "ultramem::tdqkr: v", {H, R, r}, "[H, R, r] equal to u's");
  } else {
    check_tensor(u, "ultramem::tdqkr: u", 2, fp);
    check_sizes(u, "ultramem::tdqkr: u", {H, r}, "[H, r]");
    check_tensor(v, "ultramem::tdqkr: v", 2, fp);
    check_sizes(v, "ultramem::tdqkr: v", {H, r}, "[H, r]");
  }
  for (const at::Tensor* t : {&s_col, &cores, &u, &v})
    TORCH_CHECK(t->scalar_type() == s_row.scalar_type(),
                "ultramem::tdqkr: s_row, s_col, cores, u and v must share one dtype, got ",
                s_row.scalar_type(), " and ", t->scalar_type());
  const char* bad = kernels::tdqkr_check_shape(shape_of(s_row, cores, m_first, m, m_neg, filter_rank_of(u)));
  TORCH_CHECK(bad == nullptr, "ultramem::tdqkr: ", bad ? bad : "", " (n=", n, ", m_first=", m_first,
              ", m=", m, ", m_neg=", m_neg, ", filter_rank=", filter_rank_of(u), ")");
}

struct TdqkrFunction : public torch::autograd::Function<TdqkrFunction> {
  static tensor_list forward(AutogradContext* ctx, at::Tensor s_row, at::Tensor s_col,
                             at::Tensor cores, at::Tensor u, at::Tensor v, int64_t m_first,
                             int64_t m, int64_t m_neg) {
    s_row = s_row.contiguous();
    s_col = s_col.contiguous();
    cores = cores.contiguous();
    u = u.contiguous();
    v = v.contiguous();
    const auto s = shape_of(s_row, cores, m_first, m, m_neg, filter_rank_of(u));
    at::Tensor scores = at::empty({s.T, s.H * s.m, s.C}, s_row.options());
    at::Tensor index = at::empty({s.T, s.H * s.m}, s_row.options().dtype(at::kLong));
    AT_DISPATCH_FLOATING_TYPES(s_row.scalar_type(), "ultramem::tdqkr", [&] {
      kernels::tdqkr_forward<scalar_t>(s, s_row.data_ptr<scalar_t>(), s_col.data_ptr<scalar_t>(),
                                       cores.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(),
                                       v.data_ptr<scalar_t>(), scores.data_ptr<scalar_t>(),
                                       index.data_ptr<int64_t>());
    });
    ctx->save_for_backward({s_row, s_col, cores, index});
    ctx->saved_data["m_first"] = m_first;
    ctx->saved_data["m"] = m;
    ctx->saved_data["m_neg"] = m_neg;
    ctx->mark_non_differentiable({index});
    return {scores, index};
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &s_row = saved[0], &s_col = saved[1], &cores = saved[2], &index = saved[3];
    const auto s = shape_of(s_row, cores, ctx->saved_data["m_first"].toInt(),
                            ctx->saved_data["m"].toInt(), ctx->saved_data["m_neg"].toInt());
    at::Tensor dscores = grads[0].defined()
                             ? grads[0].contiguous()
                             : at::zeros({s.T, s.H * s.m, s.C}, s_row.options());
    at::Tensor ds_row = at::empty_like(s_row), ds_col = at::empty_like(s_col),
               dcores = at::empty_like(cores);
    AT_DISPATCH_FLOATING_TYPES(s_row.scalar_type(), "ultramem::tdqkr_backward", [&] {
      kernels::tdqkr_backward<scalar_t>(s, s_row.data_ptr<scalar_t>(), s_col.data_ptr<scalar_t>(),
                                        cores.data_ptr<scalar_t>(), index.data_ptr<int64_t>(),
                                        dscores.data_ptr<scalar_t>(), ds_row.data_ptr<scalar_t>(),
                                        ds_col.data_ptr<scalar_t>(), dcores.data_ptr<scalar_t>());
    });
    return {ds_row, ds_col, dcores, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> tdqkr(const at::Tensor& s_row, const at::Tensor& s_col,
                                         const at::Tensor& cores, const at::Tensor& u,
                                         const at::Tensor& v, int64_t m_first, int64_t m, int64_t m_neg) {
  check_args(s_row, s_col, cores, u, v, m_first, m, m_neg);
  auto out = TdqkrFunction::apply(s_row, s_col, cores, u.detach(), v.detach(), m_first, m, m_neg);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> tdqkr_exact(const at::Tensor& s_row_in, const at::Tensor& s_col_in,
                                               const at::Tensor& cores_in, int64_t m) {
  const at::Tensor s_row = s_row_in.detach().contiguous(), s_col = s_col_in.detach().contiguous(),
                   cores = cores_in.detach().contiguous();
  const auto r_dim = s_row.dim() == 4 ? s_row.size(2) : 1;
  const auto h_dim = s_row.dim() == 4 ? s_row.size(1) : 1;
  // u, v are not read: placeholders of the right shape for the shared argument checks.
  const at::Tensor uv = at::zeros({h_dim, r_dim}, s_row.options());
  const int64_t n = s_row.dim() == 4 ? s_row.size(3) : 0;
  TORCH_CHECK(m >= 1 && m <= n * n, "ultramem::tdqkr_exact: m must be in [1, n*n], got m=", m, " (n=", n, ")");
  check_args(s_row, s_col, cores, uv, uv, n, m, 0);
  const auto s = shape_of(s_row, cores, n, m, 0);
  at::Tensor scores = at::empty({s.T, s.H * s.m, s.C}, s_row.options());
  at::Tensor index = at::empty({s.T, s.H * s.m}, s_row.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(s_row.scalar_type(), "ultramem::tdqkr_exact", [&] {
    kernels::tdqkr_exact<scalar_t>(s, s_row.data_ptr<scalar_t>(), s_col.data_ptr<scalar_t>(), cores.data_ptr<scalar_t>(),
                                   scores.data_ptr<scalar_t>(), index.data_ptr<int64_t>());
  });
  return {scores, index};
}

}  // namespace ultramem::ops
