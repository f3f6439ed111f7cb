// Autograd function for the pooled value lookup (IVE + MCS) over kernels/pooled_lookup.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/autograd.h>

#include "ultramem/kernels/pooled_lookup.h"
#include "ultramem/ops/check.h"
#include "ultramem/ops/ops.h"

namespace ultramem::ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

kernels::PoolShape shape_of(const at::Tensor& values, const at::Tensor& scores, int64_t E) {
  kernels::PoolShape s;
  s.T = scores.size(0);
  s.K = scores.size(1);
  s.C = scores.size(2);
  s.N = values.size(0);
  s.Dv = values.size(1);
  s.E = E;
  return s;
}

void check_args(const at::Tensor& values, const at::Tensor& index, const at::Tensor& scores,
                const at::Tensor& perm, int64_t E) {
  using detail::check_sizes;
  using detail::check_tensor;
  const auto fp = {at::kFloat, at::kDouble};
  check_tensor(values, "ultramem::pooled_lookup: values", 2, fp);
  check_tensor(scores, "ultramem::pooled_lookup: scores", 3, fp);
  TORCH_CHECK(scores.scalar_type() == values.scalar_type(),
              "ultramem::pooled_lookup: values and scores must share one dtype, got ",
              values.scalar_type(), " and ", scores.scalar_type());
  check_tensor(index, "ultramem::pooled_lookup: index", 2, {at::kLong});
  check_sizes(index, "ultramem::pooled_lookup: index", {scores.size(0), scores.size(1)},
              "[T, K] matching scores [T, K, C]");
  TORCH_CHECK(E >= 1, "ultramem::pooled_lookup: E must be >= 1, got ", E);
  const auto s = shape_of(values, scores, E);
  const char* bad = kernels::pool_check_shape(s);
  TORCH_CHECK(bad == nullptr, "ultramem::pooled_lookup: ", bad ? bad : "", " (values ",
              detail::shape_str(values), ", scores ", detail::shape_str(scores), ", E=", E, ")");
  check_tensor(perm, "ultramem::pooled_lookup: perm", 1, {at::kLong});
  check_sizes(perm, "ultramem::pooled_lookup: perm", {E * s.N}, "[E*N]");
  // Bounds of the addresses used (O(T*K)); perm being a permutation is the caller's contract.
  const at::Tensor idx = index.contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  const at::Tensor pc = perm.contiguous();
  const int64_t* pp = pc.data_ptr<int64_t>();
  const int64_t slots = E * s.N;
  for (int64_t e = 0; e < s.T * s.K; ++e) {
    TORCH_CHECK(ip[e] >= 0 && ip[e] < slots, "ultramem::pooled_lookup: index[", e / s.K, ", ",
                e % s.K, "] = ", ip[e], " is outside [0, E*N) = [0, ", slots, ")");
    TORCH_CHECK(pp[ip[e]] >= 0 && pp[ip[e]] < slots, "ultramem::pooled_lookup: perm[", ip[e],
                "] = ", pp[ip[e]], " is outside [0, E*N) = [0, ", slots, ")");
  }
}

struct PooledLookupFunction : public torch::autograd::Function<PooledLookupFunction> {
  static tensor_list forward(AutogradContext* ctx, at::Tensor values, at::Tensor index,
                             at::Tensor scores, at::Tensor perm, int64_t E, bool sparse_grad) {
    values = values.contiguous();
    index = index.contiguous();
    scores = scores.contiguous();
    perm = perm.contiguous();
    const auto s = shape_of(values, scores, E);
    at::Tensor out = at::empty({s.T, s.E * s.Dv}, values.options());
    AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "ultramem::pooled_lookup", [&] {
      kernels::pooled_lookup_forward<scalar_t>(s, values.data_ptr<scalar_t>(), index.data_ptr<int64_t>(),
                                               scores.data_ptr<scalar_t>(), perm.data_ptr<int64_t>(),
                                               out.data_ptr<scalar_t>());
    });
    ctx->save_for_backward({values, index, scores, perm});
    ctx->saved_data["E"] = E;
    ctx->saved_data["sparse_grad"] = sparse_grad;
    return {out};
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &values = saved[0], &index = saved[1], &scores = saved[2], &perm = saved[3];
    const auto s = shape_of(values, scores, ctx->saved_data["E"].toInt());
    const bool sparse_grad = ctx->saved_data["sparse_grad"].toBool();
    const at::Tensor dout = grads[0].defined() ? grads[0].contiguous()
                                               : at::zeros({s.T, s.E * s.Dv}, values.options());
    at::Tensor dvalues, dscores;
    if (ctx->needs_input_grad(2)) {
      dscores = at::empty_like(scores);
      AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "ultramem::pooled_lookup_backward_scores", [&] {
        kernels::pooled_lookup_backward_scores<scalar_t>(
            s, values.data_ptr<scalar_t>(), index.data_ptr<int64_t>(), perm.data_ptr<int64_t>(),
            dout.data_ptr<scalar_t>(), dscores.data_ptr<scalar_t>());
      });
    }
    if (ctx->needs_input_grad(0)) {
      kernels::RowGroups groups;
      kernels::group_hits_by_row(s, index.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), groups);
      const int64_t U = static_cast<int64_t>(groups.rows.size());
      at::Tensor rows = at::empty({U}, index.options());
      std::copy(groups.rows.begin(), groups.rows.end(), rows.data_ptr<int64_t>());
      at::Tensor grad_rows = at::empty({U, s.Dv}, values.options());
      AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "ultramem::pooled_lookup_backward_values", [&] {
        kernels::pooled_lookup_backward_values<scalar_t>(s, groups, scores.data_ptr<scalar_t>(),
                                                         dout.data_ptr<scalar_t>(),
                                                         grad_rows.data_ptr<scalar_t>());
      });
      if (sparse_grad) {
        dvalues = at::_sparse_coo_tensor_unsafe(rows.unsqueeze(0), grad_rows, {s.N, s.Dv},
                                                values.options().layout(at::kSparse));
        dvalues._coalesced_(true);
      } else {
        dvalues = at::zeros_like(values).index_copy_(0, rows, grad_rows);
      }
    }
    return {dvalues, at::Tensor(), dscores, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor pooled_lookup(const at::Tensor& values, const at::Tensor& index, const at::Tensor& scores,
                         const at::Tensor& perm, int64_t E, bool sparse_grad) {
  check_args(values, index, scores, perm, E);
  return PooledLookupFunction::apply(values, index, scores, perm, E, sparse_grad)[0];
}

}  // namespace ultramem::ops
