#include "ultramem/ops/block_decode.h"

#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "ultramem/kernels/small_matmul.h"
#include "ultramem/ops/check.h"
#include "ultramem/ops/project.h"
#include "ultramem/ops/value_quant.h"

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
void attention_impl(const S* x, int64_t B, int64_t D, int64_t nh, const Matrix& wqkv, const Matrix& wo,
                    const double* cos, const double* sin, S* ck, S* cv, int64_t L, const int64_t* slot,
                    const int64_t* pos, S* out) {
  const int64_t hd = D / nh, half = hd / 2;
  int64_t longest = 1;
  for (int64_t b = 0; b < B; ++b) longest = std::max(longest, pos[b] + 1);
  auto& sc = scratch<S>();
  sc.qkv.resize(B * 3 * D);
  sc.att.resize(B * D);
  S* qkv = sc.qkv.data();
  S* att = sc.att.data();
  project<S>(x, B, D, wqkv, qkv);  // [B, 3*D]: q | k | v, heads contiguous inside each
  const S q_scale = S(1.0 / std::sqrt(double(hd)));
  // Each (sequence, head): rotate q and k at the sequence's position, append k and v to its cache slot,
  // attend over [0, pos].
  at::parallel_for(0, B * nh, std::max<int64_t>(1, 4096 / std::max<int64_t>(longest * hd, 1)), [&](int64_t j0, int64_t j1) {
    std::vector<S> probs(longest);
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t b = j / nh, h = j % nh, p = pos[b];
      S* q = qkv + b * 3 * D + h * hd;
      S* k = q + D;
      const S* v = q + 2 * D;
      rotate(q, half, cos + p * half, sin + p * half);
      rotate(k, half, cos + p * half, sin + p * half);
      for (int64_t i = 0; i < hd; ++i) q[i] *= q_scale;
      S* Kc = ck + (slot[b] * nh + h) * L * hd;  // [L, hd]
      S* Vc = cv + (slot[b] * nh + h) * L * hd;
      std::copy(k, k + hd, Kc + p * hd);
      std::copy(v, v + hd, Vc + p * hd);
      // One kernel call per head (not the OpenMP matrix kernels: a head's problem is tiny and entering
      // a parallel region per head cost ~12% of a batch-64 step).
      kernels::attend_cached<S>(p + 1, hd, q, Kc, Vc, probs.data(), att + b * D + h * hd);
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

namespace {

// Checks a Matrix argument against x's dtype st: float [K, N] (or [N, K] when nt) of dtype st, or
// compact [N, K] rows (bf16, or int8 with a float32 scale [N]); returns it contiguous with N.
std::pair<Matrix, int64_t> checked_matrix(const Matrix& m, const char* what, at::ScalarType st, int64_t K, bool nt) {
  TORCH_CHECK(m.w.defined(), what, " is undefined");
  if (!m.compact()) {
    check_tensor(m.w, what, 2, {st});
    TORCH_CHECK(!m.scale.defined(), what, ": a float matrix takes no scale");
    const int64_t k_dim = nt ? 1 : 0;
    TORCH_CHECK(m.w.size(k_dim) == K, what, " must be ", nt ? "[N, K=" : "[K=", K, nt ? "]" : ", N]", ", got ",
                detail::shape_str(m.w));
    return {Matrix(m.w.contiguous()), m.w.size(1 - k_dim)};
  }
  check_tensor(m.w, what, 2, {at::kBFloat16, at::kChar});
  TORCH_CHECK(st == at::kFloat, what, ": compact (bf16 / int8) weights need a float32 input, got ", st);
  TORCH_CHECK(m.w.size(1) == K, what, " (compact rows) must be [N, K=", K, "], got ", detail::shape_str(m.w));
  const int64_t N = m.w.size(0);
  if (m.w.scalar_type() == at::kChar) {
    check_tensor(m.scale, (std::string(what) + " scale").c_str(), 1, {at::kFloat});
    check_sizes(m.scale, (std::string(what) + " scale").c_str(), {N}, "[N], one per row");
    return {Matrix(m.w.contiguous(), m.scale.contiguous()), N};
  }
  TORCH_CHECK(!m.scale.defined(), what, ": bf16 rows take no scale");
  return {Matrix(m.w.contiguous()), N};
}

}  // namespace

Matrix compact_rows(const at::Tensor& rows, const std::string& format) {
  check_tensor(rows, "compact_rows: rows", 2, {at::kFloat});
  const at::Tensor rc = rows.contiguous();
  if (format == "bf16") return Matrix(quantize_values_bf16(rc));
  if (format == "int8") {
    auto [q, scale] = quantize_values_int8(rc);
    return Matrix(q, scale);
  }
  throw std::invalid_argument("compact_rows: format must be bf16 or int8, got '" + format + "'");
}

at::Tensor widen_rows(const Matrix& m) {
  TORCH_CHECK(m.compact(), "widen_rows: the matrix is not compact (dtype ", m.w.scalar_type(), ")");
  if (m.w.scalar_type() == at::kBFloat16) return dequantize_values_bf16(m.w);
  return m.w.to(at::kFloat) * m.scale.unsqueeze(1);  // float(q) * scale, one rounding
}

at::Tensor swiglu_forward(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& w_out) {
  return swiglu_forward(x, Matrix(w_in), Matrix(w_out));
}

at::Tensor swiglu_forward(const at::Tensor& x, const Matrix& w_in, const Matrix& w_out) {
  check_tensor(x, "swiglu_forward: x", 2, {at::kFloat, at::kDouble});
  const auto st = x.scalar_type();
  const int64_t T = x.size(0), D = x.size(1);
  const auto [ic, n_in] = checked_matrix(w_in, "swiglu_forward: w_in", st, D, false);
  TORCH_CHECK(n_in % 2 == 0 && n_in > 0, "swiglu_forward: w_in must have 2*h outputs (gate | up), got ", n_in);
  const int64_t h = n_in / 2;
  const auto [oc, n_out] = checked_matrix(w_out, "swiglu_forward: w_out", st, h, false);
  TORCH_CHECK(n_out == D, "swiglu_forward: w_out must map h = ", h, " to D = ", D, " outputs, got ", n_out);
  const at::Tensor xc = x.contiguous();
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

at::Tensor linear_nt(const at::Tensor& x, const at::Tensor& w) { return linear_nt(x, Matrix(w)); }

at::Tensor linear_nt(const at::Tensor& x, const Matrix& w) {
  check_tensor(x, "linear_nt: x", 2, {at::kFloat, at::kDouble});
  const int64_t T = x.size(0), K = x.size(1);
  const auto [wc, N] = checked_matrix(w, "linear_nt: w", x.scalar_type(), K, true);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = torch::empty({T, N}, x.options());
  if (T == 0) return y;
  if (x.scalar_type() == at::kFloat)
    detail::project_nt<float>(xc.data_ptr<float>(), T, K, wc.w, wc.scale, y.data_ptr<float>(), /*q8=*/true);
  else
    detail::project_nt<double>(xc.data_ptr<double>(), T, K, wc.w, wc.scale, y.data_ptr<double>());
  return y;
}

at::Tensor attention_decode(const at::Tensor& x, const at::Tensor& wqkv, const at::Tensor& wo, const at::Tensor& cos,
                            const at::Tensor& sin, at::Tensor& cache_k, at::Tensor& cache_v, int64_t pos) {
  return attention_decode(x, Matrix(wqkv), Matrix(wo), cos, sin, cache_k, cache_v, pos);
}

at::Tensor attention_decode(const at::Tensor& x, const Matrix& wqkv, const Matrix& wo, const at::Tensor& cos,
                            const at::Tensor& sin, at::Tensor& cache_k, at::Tensor& cache_v, int64_t pos) {
  TORCH_CHECK(x.dim() == 2 && cache_k.dim() == 4 && cache_k.size(0) == x.size(0), "attention_decode: cache_k must be [B=",
              x.dim() == 2 ? x.size(0) : -1, ", nh, L, hd], got ", detail::shape_str(cache_k));
  TORCH_CHECK(pos >= 0 && pos < cache_k.size(2), "attention_decode: pos must be in [0, L = ", cache_k.size(2), "), got ",
              pos);
  const int64_t B = x.size(0);
  std::vector<int64_t> slots(B), positions(B, pos);
  for (int64_t b = 0; b < B; ++b) slots[b] = b;
  return attention_decode(x, wqkv, wo, cos, sin, cache_k, cache_v, slots, positions);
}

at::Tensor attention_decode(const at::Tensor& x, const Matrix& wqkv, const Matrix& wo, const at::Tensor& cos,
                            const at::Tensor& sin, at::Tensor& cache_k, at::Tensor& cache_v, at::IntArrayRef slots,
                            at::IntArrayRef positions) {
  check_tensor(x, "attention_decode: x", 2, {at::kFloat, at::kDouble});
  const auto st = x.scalar_type();
  const int64_t B = x.size(0), D = x.size(1);
  check_tensor(cache_k, "attention_decode: cache_k", 4, {st});
  const int64_t S = cache_k.size(0), nh = cache_k.size(1), L = cache_k.size(2), hd = cache_k.size(3);
  TORCH_CHECK(nh >= 1 && nh * hd == D && hd % 2 == 0, "attention_decode: cache_k must be [S, nh, L, hd] with nh * hd = D = ",
              D, " and hd even, got ", detail::shape_str(cache_k));
  check_tensor(cache_v, "attention_decode: cache_v", 4, {st});
  check_sizes(cache_v, "attention_decode: cache_v", {S, nh, L, hd}, "[S, nh, L, hd] equal to cache_k's");
  TORCH_CHECK(cache_k.is_contiguous() && cache_v.is_contiguous(), "attention_decode: the caches must be contiguous");
  TORCH_CHECK(int64_t(slots.size()) == B && int64_t(positions.size()) == B, "attention_decode: slots and positions must hold B = ",
              B, " entries, got ", slots.size(), " and ", positions.size());
  const auto [qc, n_qkv] = checked_matrix(wqkv, "attention_decode: wqkv", st, D, false);
  TORCH_CHECK(n_qkv == 3 * D, "attention_decode: wqkv must have 3*D = ", 3 * D, " outputs, got ", n_qkv);
  const auto [oc, n_o] = checked_matrix(wo, "attention_decode: wo", st, D, false);
  TORCH_CHECK(n_o == D, "attention_decode: wo must have D = ", D, " outputs, got ", n_o);
  int64_t P = L;
  for (const at::Tensor* t : {&cos, &sin}) {
    check_tensor(*t, "attention_decode: cos/sin", 2, {at::kDouble});
    TORCH_CHECK(t->size(1) == hd / 2, "attention_decode: cos and sin must be [P, hd/2 = ", hd / 2, "], got ",
                detail::shape_str(*t));
    P = std::min(P, t->size(0));
  }
  std::vector<char> taken(S, 0);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(slots[b] >= 0 && slots[b] < S, "attention_decode: slot ", slots[b], " of sequence ", b,
                " is outside the cache's S = ", S, " slots");
    TORCH_CHECK(!taken[slots[b]], "attention_decode: slot ", slots[b], " is given to two sequences");
    taken[slots[b]] = 1;
    TORCH_CHECK(positions[b] >= 0 && positions[b] < P, "attention_decode: position ", positions[b], " of sequence ", b,
                " must be in [0, ", P, ") (the cache's length L and the rotary tables' P)");
  }
  const at::Tensor xc = x.contiguous();
  const at::Tensor cc = cos.contiguous(), sc = sin.contiguous();
  at::Tensor out = torch::empty({B, D}, x.options());
  if (B == 0) return out;
  if (st == at::kFloat)
    attention_impl<float>(xc.data_ptr<float>(), B, D, nh, qc, oc, cc.data_ptr<double>(), sc.data_ptr<double>(),
                          cache_k.data_ptr<float>(), cache_v.data_ptr<float>(), L, slots.data(), positions.data(),
                          out.data_ptr<float>());
  else
    attention_impl<double>(xc.data_ptr<double>(), B, D, nh, qc, oc, cc.data_ptr<double>(), sc.data_ptr<double>(),
                           cache_k.data_ptr<double>(), cache_v.data_ptr<double>(), L, slots.data(), positions.data(),
                           out.data_ptr<double>());
  return out;
}

}  // namespace ultramem::ops
