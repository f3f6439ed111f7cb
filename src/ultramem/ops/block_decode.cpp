#include "ultramem/ops/block_decode.h"

#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ultramem/kernels/small_matmul.h"
#include "ultramem/ops/check.h"
#include "ultramem/ops/project.h"

namespace ultramem::ops {
namespace {

using detail::check_sizes;
using detail::check_tensor;
using detail::project;


// Per-thread scratch, reused across calls (no allocation once grown).
template <typename S>
struct Scratch {
  std::vector<S> qkv, att, hid, act;
};
template <typename S>
Scratch<S>& scratch() {
  thread_local Scratch<S> s;
  return s;
}

template <typename S>
void rms_norm_impl(const S* x, int64_t T, int64_t D, const S* w, double eps, S* y) {
  at::parallel_for(0, T, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) detail::rms_normalise_row(x + t * D, D, w, eps, y + t * D);
  });
}

// RoPE, half-split pairs (z[i], z[i + half]) at one position: c, s are that position's angles.
template <typename S>
void rotate(S* z, int64_t half, const double* c, const double* s) {
  for (int64_t i = 0; i < half; ++i) {
    const S ci = S(c[i]), si = S(s[i]);
    const S a = z[i], b = z[i + half];
    z[i] = a * ci - b * si;
    z[i + half] = a * si + b * ci;
  }
}

template <typename S>
void attention_impl(const S* x, int64_t B, int64_t D, int64_t nh, const at::Tensor& wqkv, const at::Tensor& wo,
                    const double* cos_p, const double* sin_p, S* ck, S* cv, int64_t L, int64_t pos, S* out) {
  const int64_t hd = D / nh, half = hd / 2, S_len = pos + 1;
  auto& sc = scratch<S>();
  sc.qkv.resize(B * 3 * D);
  sc.att.resize(B * D);
  S* qkv = sc.qkv.data();
  S* att = sc.att.data();
  project<S>(x, B, D, wqkv, qkv);  // [B, 3*D]: q | k | v, heads contiguous inside each
  const S q_scale = S(1.0 / std::sqrt(double(hd)));
  // Each (sequence, head): rotate q and k, append k and v to the cache, attend over [0, pos].
  at::parallel_for(0, B * nh, std::max<int64_t>(1, 4096 / std::max<int64_t>(S_len * hd, 1)), [&](int64_t j0, int64_t j1) {
    std::vector<S> probs(S_len);
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t b = j / nh, h = j % nh;
      S* q = qkv + b * 3 * D + h * hd;
      S* k = q + D;
      const S* v = q + 2 * D;
      rotate(q, half, cos_p, sin_p);
      rotate(k, half, cos_p, sin_p);
      for (int64_t i = 0; i < hd; ++i) q[i] *= q_scale;
      S* Kc = ck + (b * nh + h) * L * hd;  // [L, hd]
      S* Vc = cv + (b * nh + h) * L * hd;
      std::copy(k, k + hd, Kc + pos * hd);
      std::copy(v, v + hd, Vc + pos * hd);
      // One kernel call per head (not the OpenMP matrix kernels: a head's problem is tiny and entering
      // a parallel region per head cost ~12% of a batch-64 step).
      kernels::attend_cached<S>(S_len, hd, q, Kc, Vc, probs.data(), att + b * D + h * hd);
    }
  });
  project<S>(att, B, D, wo, out);
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_tensor(x, "rms_norm: x", 2, {at::kFloat, at::kDouble});
  const int64_t T = x.size(0), D = x.size(1);
  check_tensor(weight, "rms_norm: weight", 1, {x.scalar_type()});
  check_sizes(weight, "rms_norm: weight", {D}, "[D] with D = x.size(1)");
  TORCH_CHECK(eps >= 0, "rms_norm: eps must be >= 0, got ", eps);
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor y = torch::empty({T, D}, x.options());
  if (x.scalar_type() == at::kFloat)
    rms_norm_impl<float>(xc.data_ptr<float>(), T, D, wc.data_ptr<float>(), eps, y.data_ptr<float>());
  else
    rms_norm_impl<double>(xc.data_ptr<double>(), T, D, wc.data_ptr<double>(), eps, y.data_ptr<double>());
  return y;
}

at::Tensor swiglu_forward(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& w_out) {
  check_tensor(x, "swiglu_forward: x", 2, {at::kFloat, at::kDouble});
  const auto st = x.scalar_type();
  const int64_t T = x.size(0), D = x.size(1);
  check_tensor(w_in, "swiglu_forward: w_in", 2, {st});
  TORCH_CHECK(w_in.size(0) == D && w_in.size(1) % 2 == 0 && w_in.size(1) > 0,
              "swiglu_forward: w_in must be [D=", D, ", 2*h], got ", detail::shape_str(w_in));
  const int64_t h = w_in.size(1) / 2;
  check_tensor(w_out, "swiglu_forward: w_out", 2, {st});
  check_sizes(w_out, "swiglu_forward: w_out", {h, D}, "[h, D] with 2*h = w_in.size(1)");
  const at::Tensor xc = x.contiguous(), ic = w_in.contiguous(), oc = w_out.contiguous();
  at::Tensor y = torch::empty({T, D}, x.options());
  if (T == 0) return y;
  if (st == at::kFloat) {
    auto& sc = scratch<float>();
    detail::swiglu_rows<float>(xc.data_ptr<float>(), T, D, ic, oc, sc.hid, sc.act, y.data_ptr<float>());
  } else {
    auto& sc = scratch<double>();
    detail::swiglu_rows<double>(xc.data_ptr<double>(), T, D, ic, oc, sc.hid, sc.act, y.data_ptr<double>());
  }
  return y;
}

at::Tensor linear_nt(const at::Tensor& x, const at::Tensor& w) {
  check_tensor(x, "linear_nt: x", 2, {at::kFloat, at::kDouble});
  const int64_t T = x.size(0), K = x.size(1);
  check_tensor(w, "linear_nt: w", 2, {x.scalar_type()});
  TORCH_CHECK(w.size(1) == K, "linear_nt: w must be [N, K=", K, "], got ", detail::shape_str(w));
  const int64_t N = w.size(0);
  if (T > detail::kSmallRows) return at::mm(x, w.t());
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  at::Tensor y = torch::empty({T, N}, x.options());
  if (x.scalar_type() == at::kFloat)
    kernels::matmul_rows_nt<float>(T, K, N, xc.data_ptr<float>(), wc.data_ptr<float>(), y.data_ptr<float>());
  else
    kernels::matmul_rows_nt<double>(T, K, N, xc.data_ptr<double>(), wc.data_ptr<double>(), y.data_ptr<double>());
  return y;
}

at::Tensor attention_decode(const at::Tensor& x, const at::Tensor& wqkv, const at::Tensor& wo, const at::Tensor& cos,
                            const at::Tensor& sin, at::Tensor& cache_k, at::Tensor& cache_v, int64_t pos) {
  check_tensor(x, "attention_decode: x", 2, {at::kFloat, at::kDouble});
  const auto st = x.scalar_type();
  const int64_t B = x.size(0), D = x.size(1);
  check_tensor(cache_k, "attention_decode: cache_k", 4, {st});
  const int64_t nh = cache_k.size(1), L = cache_k.size(2), hd = cache_k.size(3);
  TORCH_CHECK(cache_k.size(0) == B && nh >= 1 && nh * hd == D && hd % 2 == 0,
              "attention_decode: cache_k must be [B=", B, ", nh, L, hd] with nh * hd = D = ", D,
              " and hd even, got ", detail::shape_str(cache_k));
  check_tensor(cache_v, "attention_decode: cache_v", 4, {st});
  check_sizes(cache_v, "attention_decode: cache_v", {B, nh, L, hd}, "[B, nh, L, hd] equal to cache_k's");
  TORCH_CHECK(cache_k.is_contiguous() && cache_v.is_contiguous(), "attention_decode: the caches must be contiguous");
  TORCH_CHECK(pos >= 0 && pos < L, "attention_decode: pos must be in [0, L = ", L, "), got ", pos);
  check_tensor(wqkv, "attention_decode: wqkv", 2, {st});
  check_sizes(wqkv, "attention_decode: wqkv", {D, 3 * D}, "[D, 3*D]");
  check_tensor(wo, "attention_decode: wo", 2, {st});
  check_sizes(wo, "attention_decode: wo", {D, D}, "[D, D]");
  for (const at::Tensor* t : {&cos, &sin}) {
    check_tensor(*t, "attention_decode: cos/sin", 2, {at::kDouble});
    TORCH_CHECK(t->size(0) > pos && t->size(1) == hd / 2, "attention_decode: cos and sin must be [P > pos = ", pos,
                ", hd/2 = ", hd / 2, "], got ", detail::shape_str(*t));
  }
  const at::Tensor xc = x.contiguous(), qc = wqkv.contiguous(), oc = wo.contiguous();
  const at::Tensor cc = cos.contiguous(), sc = sin.contiguous();
  at::Tensor out = torch::empty({B, D}, x.options());
  if (B == 0) return out;
  const double* cp = cc.data_ptr<double>() + pos * (hd / 2);
  const double* sp = sc.data_ptr<double>() + pos * (hd / 2);
  if (st == at::kFloat)
    attention_impl<float>(xc.data_ptr<float>(), B, D, nh, qc, oc, cp, sp, cache_k.data_ptr<float>(),
                          cache_v.data_ptr<float>(), L, pos, out.data_ptr<float>());
  else
    attention_impl<double>(xc.data_ptr<double>(), B, D, nh, qc, oc, cp, sp, cache_k.data_ptr<double>(),
                           cache_v.data_ptr<double>(), L, pos, out.data_ptr<double>());
  return out;
}

}  // namespace ultramem::ops
