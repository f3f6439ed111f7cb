#include "ultramem/ops/ultramem_decode.h"

#include <torch/torch.h>

#include <cmath>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "ultramem/kernels/pooled_lookup.h"
#include "ultramem/kernels/small_matmul.h"
#include "ultramem/kernels/tdqkr.h"
#include "ultramem/ops/check.h"
#include "ultramem/ops/project.h"
#include "ultramem/ops/value_quant.h"

namespace ultramem::ops {
namespace {

using detail::dtype_of;
using detail::project;
using detail::sized;



// Per-thread scratch buffers, reused across calls (no allocation once grown).
template <typename S>
struct Scratch {
  std::vector<S> q, qr, qc, f_row, f_col, s_row, s_col, pooled, dots, eye;  // eye: filter weights
  std::vector<S> p, weights, summed;  // V2: pre-value query, weighted scores, the E pools summed
  std::vector<int32_t> irow, icol, rows;
};
template <typename S>
Scratch<S>& scratch() {
  thread_local Scratch<S> s;
  return s;
}


// Normalises x[0:Dk] in place (RMS or Layer, eps 1e-6 as the autograd path) and scales it.
template <typename S>
void normalise(S* x, int64_t Dk, const S* scale, bool rms) {
  constexpr double eps = 1e-6;
  if (rms) return detail::rms_normalise_row(x, Dk, scale, eps, x);
  double mean = 0;
  for (int64_t i = 0; i < Dk; ++i) mean += double(x[i]);
  mean /= double(Dk);
  double var = 0;
  for (int64_t i = 0; i < Dk; ++i) var += (double(x[i]) - mean) * (double(x[i]) - mean);
  const S r = S(1.0 / std::sqrt(var / double(Dk) + eps));
  for (int64_t i = 0; i < Dk; ++i) x[i] = (x[i] - S(mean)) * r * scale[i];
}

// A contiguous CPU tensor of one of `dtypes` and exactly `sizes` (ops/check.h's checks, named).
void check_arg(const at::Tensor& t, const char* what, std::initializer_list<int64_t> sizes,
               std::initializer_list<at::ScalarType> dtypes) {
  detail::check_tensor(t, what, int64_t(sizes.size()), dtypes);
  bool ok = true;
  int64_t d = 0;
  for (int64_t s : sizes) ok = ok && t.size(d++) == s;
  if (!ok) {  // the message is built only on failure
    std::string expected = "[";
    for (int64_t s : sizes) expected += (expected.size() > 1 ? ", " : "") + std::to_string(s);
    detail::check_sizes(t, what, sizes, (expected + "]").c_str());
  }
  TORCH_CHECK(t.is_contiguous(), what, " must be contiguous");
}

// Side `side` (0 row, 1 col) of a [2, rows, Dk] key table in any stored format, and its row scales
// (int8) or an undefined tensor.
std::pair<at::Tensor, at::Tensor> key_side(const at::Tensor& keys, const at::Tensor& scale, int64_t side) {
  return {keys[side], scale.defined() ? scale[side] : at::Tensor()};
}

// Query, TDQKR filter, exact scores of the kept rows and rescoring: the kept candidates of every token.
template <typename S>
void retrieve_impl(const S* u, int64_t T, const UltraMemDecodeWeights& w, const UltraMemDims& c,
                   S* scores,        // [T, H*m, C] out
                   int64_t* index) {  // [T, H*m] out
  const int64_t Dk = c.Dk, HRn = c.H * c.r * c.n;
  const int64_t qw = c.query_width(), QR = qw / Dk;  // query values per side, queries per side (r with V2)

  const torch::Tensor kn = w.keys.kn, kf = w.keys.kf;
  const torch::Tensor wq_c = w.wq.contiguous();
  const torch::Tensor qs = w.q_scale.contiguous(), cores_c = w.cores.contiguous();

  auto& sc = scratch<S>();
  S* q = sized(sc.q, T * 2 * qw);   // [T, 2, QR, Dk]
  S* qr = sized(sc.qr, T * qw);     // [T, QR, Dk]
  S* qc = sized(sc.qc, T * qw);     // [T, QR, Dk]
  S* s_row = sized(sc.s_row, T * HRn);
  S* s_col = sized(sc.s_col, T * HRn);

  // Query and its two halves, each of its QR queries normalised.
  project<S>(u, T, c.D, wq_c, q);
  const S* qscale = qs.data_ptr<S>();
  for (int64_t t = 0; t < T; ++t) {
    std::copy(q + t * 2 * qw, q + t * 2 * qw + qw, qr + t * qw);
    std::copy(q + t * 2 * qw + qw, q + (t + 1) * 2 * qw, qc + t * qw);
    for (int64_t a = 0; a < QR; ++a) {
      normalise(qr + t * qw + a * Dk, Dk, qscale, c.rms_norm);
      normalise(qc + t * qw + a * Dk, Dk, qscale + Dk, c.rms_norm);
    }
  }
  // TDQKR, stage 1: filter scores against the folded keys, f_side[t, h, k, i] (k < R, R = 1 for the
  // signed rank-1 filter), and the top m_first.
  const int64_t R = c.filter_vectors(), Hn = c.H * R * c.n, m1 = (c.m_first > 0 ? c.m_first : c.m);
  S* f_row = sized(sc.f_row, T * Hn);
  S* f_col = sized(sc.f_col, T * Hn);
  // [T, qw] @ kf[side]^T (float or compact key rows): the few-row kernel or BLAS, as project().
  // Compact keys with more than the few rows: their widened copy, one BLAS product per side.
  const bool wide = std::is_same_v<S, float> && w.keys.kf_wide.defined() && T > detail::kSmallRows &&
                    !ultramem::batch_invariant();
  for (int side = 0; side < 2; ++side) {
    const auto [rows, scale] = wide ? key_side(w.keys.kf_wide, at::Tensor(), side) : key_side(kf, w.keys.kf_scale, side);
    detail::project_nt<S>(side == 0 ? qr : qc, T, qw, rows, scale, side == 0 ? f_row : f_col);
  }
  kernels::TdqkrShape ts;
  ts.T = T;
  ts.H = c.H;
  ts.r = c.r;
  ts.n = c.n;
  ts.C = c.C;
  ts.m_first = m1;
  ts.m = c.m;
  ts.m_neg = c.m_neg;
  ts.filter_rank = c.filter_rank;
  // The filter on f as a problem of rank R with identity weights (F_k = sum_a I[k, a] f_a = f_k exactly:
  // the other terms add zeros).
  kernels::TdqkrShape fs = ts;
  fs.r = R;
  S* eye = sized(sc.eye, c.H * R * R);
  std::fill(eye, eye + c.H * R * R, S(0));
  for (int64_t h = 0; h < c.H; ++h)
    for (int64_t k = 0; k < R; ++k) eye[(h * R + k) * R + k] = S(1);
  int32_t* irow = sized(sc.irow, T * c.H * m1);
  int32_t* icol = sized(sc.icol, T * c.H * m1);
  kernels::tdqkr_filter<S>(fs, f_row, f_col, eye, eye, irow, icol);
  // Stage 2: exact S_side[t, h, a, i] at the kept rows only (the rescoring reads nothing else), then
  // the exact rescoring with every core.
  const auto [kn_r, kn_rs] = key_side(kn, w.keys.kn_scale, 0);
  const auto [kn_c, kn_cs] = key_side(kn, w.keys.kn_scale, 1);
  const auto kn_row = detail::row_table<S>(kn_r, kn_rs), kn_col = detail::row_table<S>(kn_c, kn_cs);
  S* dots = sized(sc.dots, m1);
  int32_t* rows = sized(sc.rows, m1);
  auto exact = [&](const S* qs, const kernels::RowTable<S>& table, const int32_t* kept, S* S_side) {
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < c.H; ++h) {
        const int32_t* k = kept + (t * c.H + h) * m1;
        for (int64_t a = 0; a < c.r; ++a) {
          const int32_t base = int32_t((h * c.r + a) * c.n);
          for (int64_t x = 0; x < m1; ++x) rows[x] = base + k[x];
          kernels::gathered_dots_q<S>(Dk, qs + t * qw + (QR > 1 ? a * Dk : 0), table, rows, m1, dots);
          S* dst = S_side + ((t * c.H + h) * c.r + a) * c.n;
          for (int64_t x = 0; x < m1; ++x) dst[k[x]] = dots[x];
        }
      }
  };
  exact(qr, kn_row, irow, s_row);
  exact(qc, kn_col, icol, s_col);
  kernels::tdqkr_rescore<S>(ts, s_row, s_col, cores_c.data_ptr<S>(), irow, icol, scores, index);
}

// V2's pre-value weights: pre[t, k] = <u_t Wp, pre_values[perm[index[t, k]] mod N]>.
template <typename S>
void pre_value_impl(const S* u, int64_t T, const int64_t* index, const UltraMemDecodeWeights& w,
                    const UltraMemDims& c,
                    S* pre) {  // [T, H*m] out
  const int64_t K = c.H * c.m, Dp = c.Dp, N = c.N();
  S* p = sized(scratch<S>().p, T * Dp);  // [T, Dp]
  project<S>(u, T, c.D, w.wp.contiguous(), p);
  const S* table = w.pre_values.data_ptr<S>();
  const int64_t* perm = w.perm.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < K; ++k) {
      const S* row = table + (perm[index[t * K + k]] % N) * Dp;
      const S* pt = p + t * Dp;
      S acc = 0;
      for (int64_t j = 0; j < Dp; ++j) acc += pt[j] * row[j];
      pre[t * K + k] = acc;
    }
}

// The pooled lookup's shape for T tokens of a layer with dims d.
kernels::PoolShape pool_shape(int64_t T, const UltraMemDims& d) {
  kernels::PoolShape ps;
  ps.T = T;
  ps.K = d.H * d.m;
  ps.N = d.N();
  ps.Dv = d.Dv;
  ps.E = d.E;
  ps.C = d.C;
  return ps;
}

// out = pooled Wo, or with one projection (V2) the E pools summed first: [T, E*Dv] -> [T, D].
template <typename S>
void project_pooled(const S* pooled, int64_t T, const UltraMemDecodeWeights& w, const UltraMemDims& c, S* out) {
  if (!c.single_projection) return project<S>(pooled, T, c.E * c.Dv, w.wo.contiguous(), out);
  S* summed = sized(scratch<S>().summed, T * c.Dv);  // [T, Dv]
  for (int64_t t = 0; t < T; ++t) {
    S* dst = summed + t * c.Dv;
    std::copy(pooled + t * c.E * c.Dv, pooled + t * c.E * c.Dv + c.Dv, dst);
    for (int64_t e = 1; e < c.E; ++e) {
      const S* src = pooled + (t * c.E + e) * c.Dv;
      for (int64_t j = 0; j < c.Dv; ++j) dst[j] += src[j];
    }
  }
  project<S>(summed, T, c.Dv, w.wo.contiguous(), out);
}

// The pooled lookup of the kept candidates over the stored table (fp32, bf16 or int8), then the output
// projection.
template <typename S>
void lookup_impl(const S* scores,        // [T, H*m, C]
                 const S* pre,           // [T, H*m] pre-value weights (V2), or nullptr
                 const int64_t* index,   // [T, H*m]
                 int64_t T, const UltraMemDecodeWeights& w, const UltraMemDims& c,
                 S* out) {               // [T, D] out
  const auto st = dtype_of<S>();
  if (pre) {  // each slot's C scores times its pre-value weight
    const int64_t K = c.H * c.m;
    S* weighted = sized(scratch<S>().weights, T * K * c.C);
    for (int64_t s = 0; s < T * K; ++s)
      for (int64_t k = 0; k < c.C; ++k) weighted[s * c.C + k] = scores[s * c.C + k] * pre[s];
    scores = weighted;
  }
  S* pooled = sized(scratch<S>().pooled, T * c.E * c.Dv);
  const kernels::PoolShape ps = pool_shape(T, c);
  const int64_t* pp = w.perm.data_ptr<int64_t>();
  if (w.values.scalar_type() == st) {
    kernels::pooled_lookup_forward<S>(ps, w.values.data_ptr<S>(), index, scores, pp, pooled);
  } else if (w.values.scalar_type() == at::kBFloat16) {
    kernels::pooled_lookup_forward_bf16<S>(ps, reinterpret_cast<const uint16_t*>(w.values.data_ptr()), index, scores,
                                           pp, pooled);
  } else {  // int8 (check_weights)
    kernels::pooled_lookup_forward_int8<S>(ps, w.values.data_ptr<int8_t>(), w.values_scale.data_ptr<float>(), index,
                                           scores, pp, pooled);
  }
  project_pooled<S>(pooled, T, w, c, out);
}

}  // namespace

void ive_permutation(int64_t slots, uint64_t seed, uint64_t key, int64_t* out) {
  if (key != 0) {
    feistel_permutation(slots, key, out);
    return;
  }
  std::iota(out, out + slots, int64_t(0));
  std::mt19937_64 rng(seed ^ 0x9e3779b97f4a7c15ULL);
  for (int64_t i = slots - 1; i > 0; --i) {
    std::uniform_int_distribution<int64_t> pick(0, i);
    std::swap(out[i], out[pick(rng)]);
  }
}

at::Tensor ive_permutation_op(int64_t slots, int64_t seed, int64_t key) {
  if (slots < 1) throw std::invalid_argument("ive_permutation: slots must be >= 1, got " + std::to_string(slots));
  auto out = at::empty({slots}, at::kLong);
  ive_permutation(slots, static_cast<uint64_t>(seed), static_cast<uint64_t>(key), out.data_ptr<int64_t>());
  return out;
}

std::string permutation_error(const at::Tensor& perm, int64_t slots) {
  if (!perm.defined() || perm.scalar_type() != at::kLong || !perm.is_contiguous() || perm.dim() != 1 ||
      perm.numel() != slots)
    return "perm must be a contiguous int64 tensor [" + std::to_string(slots) + "]";
  const int64_t* p = perm.data_ptr<int64_t>();
  for (int64_t g = 0; g < slots; ++g)
    if (p[g] < 0 || p[g] >= slots)
      return "perm[" + std::to_string(g) + "] = " + std::to_string(p[g]) + " is outside [0, " + std::to_string(slots) + ")";
  return "";
}

UltraMemDecodeKeys fold_filter_keys(const at::Tensor& kn_row, const at::Tensor& kn_col, const at::Tensor& u,
                                    const at::Tensor& v, bool per_rank) {
  const int64_t H = kn_row.size(0), n = kn_row.size(1), r = kn_row.size(2), Dk = kn_row.size(3);
  UltraMemDecodeKeys k;
  const auto row = kn_row.permute({0, 2, 1, 3});  // [H, r, n, Dk]
  const auto col = kn_col.permute({0, 2, 1, 3});
  k.kn = torch::stack({row, col}).reshape({2, H * r * n, Dk}).contiguous();
  const int64_t R = u.dim() == 3 ? u.size(1) : 1;
  const auto w = torch::stack({u, v}).to(kn_row.scalar_type()).view({2, H, R, r, 1, 1});
  const auto terms = k.kn.view({2, H, 1, r, n, Dk}) * w;  // [2, H, R, r, n, Dk]
  k.kf = per_rank ? terms.permute({0, 1, 2, 4, 3, 5}).reshape({2, H * R * n, r * Dk}).contiguous()
                  : terms.sum(3).reshape({2, H * R * n, Dk}).contiguous();
  return k;
}

UltraMemDecodeKeys compact_keys(const UltraMemDecodeKeys& keys, const std::string& format) {
  if (format == "fp32") return keys;
  auto one = [&](const at::Tensor& t, at::Tensor& scale) -> at::Tensor {
    const auto rows = t.to(at::kFloat).reshape({-1, t.size(2)});  // [2*rows, Dk]
    if (format == "bf16") return quantize_values_bf16(rows).view(t.sizes());
    auto [q, s] = quantize_values_int8(rows);
    scale = s.view({2, t.size(1)});
    return q.view(t.sizes());
  };
  if (format != "bf16" && format != "int8")
    throw std::invalid_argument("key format: expected \"fp32\", \"bf16\" or \"int8\", got \"" + format + "\"");
  UltraMemDecodeKeys out;
  out.kn = one(keys.kn, out.kn_scale);
  out.kf = one(keys.kf, out.kf_scale);
  // Widened once here rather than per product (a 2^30-slot layer's filter keys are 8 MiB of int8: widening
  // them on every batched step cost more than the product; docs/tiered_tables.md).
  out.kf_wide = out.kf_scale.defined() ? out.kf.to(at::kFloat) * out.kf_scale.unsqueeze(-1) : out.kf.to(at::kFloat);
  return out;
}

namespace {

// The weights against the dims and the compute dtype st; c10::Error naming the argument.
void check_weights(const UltraMemDecodeWeights& w, const UltraMemDims& d, at::ScalarType st) {
  const int64_t N = d.N(), qw = d.query_width();
  check_arg(w.wq, "ultramem_decode: wq", {d.D, 2 * qw}, {st});
  check_arg(w.q_scale, "ultramem_decode: q_scale", {2, d.Dk}, {st});
  check_arg(w.cores, "ultramem_decode: cores", {d.C, d.H, d.r, d.r}, {st});
  check_arg(w.keys.kn, "ultramem_decode: keys.kn", {2, d.H * d.r * d.n, d.Dk}, {st, at::kBFloat16, at::kChar});
  TORCH_CHECK(d.filter_rank >= 0 && d.filter_rank <= d.r, "ultramem_decode: filter_rank must be in [0, r = ", d.r,
              "] (0: the signed rank-1 filter), got ", d.filter_rank);
  const int64_t HRf = d.H * d.filter_vectors() * d.n;  // filter key rows
  check_arg(w.keys.kf, "ultramem_decode: keys.kf", {2, HRf, qw}, {st, at::kBFloat16, at::kChar});
  if (w.keys.kn.scalar_type() == at::kChar)
    check_arg(w.keys.kn_scale, "ultramem_decode: keys.kn_scale", {2, d.H * d.r * d.n}, {at::kFloat});
  if (w.keys.kf.scalar_type() == at::kChar)
    check_arg(w.keys.kf_scale, "ultramem_decode: keys.kf_scale", {2, HRf}, {at::kFloat});
  if (d.Dp > 0)  // the pre-values are read through the stored permutation, file-served table or not
    check_arg(w.perm, "ultramem_decode: perm (the pre-values' rows)", {d.E * N}, {at::kLong});
  if (w.tiered) {
    TORCH_CHECK(w.tiered->rows() == N && w.tiered->dv() == d.Dv && w.tiered->E() == d.E, "ultramem_decode: the value "
                "table file ", w.tiered->path(), " holds ", w.tiered->rows(), " rows of ", w.tiered->dv(), " values for E = ",
                w.tiered->E(), "; the layer needs ", N, " rows of ", d.Dv, " for E = ", d.E);
    if (!w.tiered->feistel_key()) check_arg(w.perm, "ultramem_decode: perm", {d.E * N}, {at::kLong});
  } else {
    check_arg(w.values, "ultramem_decode: values", {N, d.Dv}, {st, at::kBFloat16, at::kChar});
    check_arg(w.perm, "ultramem_decode: perm", {d.E * N}, {at::kLong});
    if (w.values.scalar_type() == at::kChar) check_arg(w.values_scale, "ultramem_decode: values_scale", {N}, {at::kFloat});
  }
  check_arg(w.wo, "ultramem_decode: wo", {d.wo_rows(), d.D}, {st});
  if (d.Dp > 0) {
    check_arg(w.wp, "ultramem_decode: wp", {d.D, d.Dp}, {st});
    check_arg(w.pre_values, "ultramem_decode: pre_values", {N, d.Dp}, {st});
  }
  kernels::TdqkrShape ts;
  ts.H = d.H;
  ts.r = d.r;
  ts.n = d.n;
  ts.C = d.C;
  ts.m_first = d.m_first > 0 ? d.m_first : d.m;
  ts.m = d.m;
  ts.m_neg = d.m_neg;
  ts.filter_rank = d.filter_rank;
  const char* bad = kernels::tdqkr_check_shape(ts);
  TORCH_CHECK(bad == nullptr, "ultramem_decode: ", bad ? bad : "", " (n=", d.n, ", m_first=", ts.m_first, ", m=", d.m,
              ", m_neg=", d.m_neg, ", filter_rank=", d.filter_rank, ")");
}

// The two phases without their checks (ultramem_decode checks once for both).
UltraMemRetrieval retrieve_unchecked(const at::Tensor& x, const UltraMemDecodeWeights& w, const UltraMemDims& d) {
  const int64_t T = x.size(0), K = d.H * d.m;
  UltraMemRetrieval r;
  r.scores = torch::empty({T, K, d.C}, x.options());
  r.index = torch::empty({T, K}, x.options().dtype(torch::kLong));
  if (T == 0) return r;
  if (d.Dp > 0) r.pre = torch::empty({T, K}, x.options());
  if (x.scalar_type() == at::kFloat) {
    retrieve_impl<float>(x.data_ptr<float>(), T, w, d, r.scores.data_ptr<float>(), r.index.data_ptr<int64_t>());
    if (d.Dp > 0) pre_value_impl<float>(x.data_ptr<float>(), T, r.index.data_ptr<int64_t>(), w, d, r.pre.data_ptr<float>());
  } else {
    retrieve_impl<double>(x.data_ptr<double>(), T, w, d, r.scores.data_ptr<double>(), r.index.data_ptr<int64_t>());
    if (d.Dp > 0)
      pre_value_impl<double>(x.data_ptr<double>(), T, r.index.data_ptr<int64_t>(), w, d, r.pre.data_ptr<double>());
  }
  if (w.tiered) w.tiered->submit(r.index, w.perm);  // the rows' reads start now, the lookup waits for them
  return r;
}

at::Tensor lookup_unchecked(const UltraMemRetrieval& r, const UltraMemDecodeWeights& w, const UltraMemDims& d) {
  const int64_t T = r.index.size(0);
  at::Tensor out = torch::empty({T, d.D}, r.scores.options());
  if (T == 0) return out;
  if (w.tiered) {  // the rows from the file's cache, then the same output projection
    at::Tensor pooled = torch::empty({T, d.E * d.Dv}, r.scores.options());
    const at::Tensor weights = r.pre.defined() ? (r.scores * r.pre.unsqueeze(-1)).contiguous() : r.scores;
    w.tiered->pool(r.index, w.perm, weights, d.C, pooled.data_ptr());
    if (r.scores.scalar_type() == at::kFloat)
      project_pooled<float>(pooled.data_ptr<float>(), T, w, d, out.data_ptr<float>());
    else
      project_pooled<double>(pooled.data_ptr<double>(), T, w, d, out.data_ptr<double>());
    return out;
  }
  const bool pre = r.pre.defined();
  if (r.scores.scalar_type() == at::kFloat)
    lookup_impl<float>(r.scores.data_ptr<float>(), pre ? r.pre.data_ptr<float>() : nullptr, r.index.data_ptr<int64_t>(),
                       T, w, d, out.data_ptr<float>());
  else
    lookup_impl<double>(r.scores.data_ptr<double>(), pre ? r.pre.data_ptr<double>() : nullptr,
                        r.index.data_ptr<int64_t>(), T, w, d, out.data_ptr<double>());
  return out;
}

void check_input(const at::Tensor& x, const UltraMemDims& d) {
  check_arg(x, "ultramem_decode: x", {x.dim() == 2 ? x.size(0) : -1, d.D}, {at::kFloat, at::kDouble});
}

// A retrieval against the dims: scores [T, H*m, C] float32/float64, index [T, H*m] int64 with entries in
// [0, E*N) (the lookup reads the permutation at them).
void check_retrieval(const UltraMemRetrieval& r, const UltraMemDims& d) {
  TORCH_CHECK(r.scores.defined() && (r.scores.scalar_type() == at::kFloat || r.scores.scalar_type() == at::kDouble),
              "ultramem_lookup: scores must be float32 or float64");
  check_arg(r.index, "ultramem_lookup: index", {r.index.dim() == 2 ? r.index.size(0) : -1, d.H * d.m}, {at::kLong});
  check_arg(r.scores, "ultramem_lookup: scores", {r.index.size(0), d.H * d.m, d.C}, {r.scores.scalar_type()});
  if (d.Dp > 0)
    check_arg(r.pre, "ultramem_lookup: pre (the pre-value weights)", {r.index.size(0), d.H * d.m}, {r.scores.scalar_type()});
  else
    TORCH_CHECK(!r.pre.defined(), "ultramem_lookup: pre-value weights given to a layer without pre-values (Dp = 0)");
  const int64_t* g = r.index.data_ptr<int64_t>();
  const int64_t slots = d.E * d.N();
  for (int64_t e = 0; e < r.index.numel(); ++e)
    TORCH_CHECK(g[e] >= 0 && g[e] < slots, "ultramem_lookup: index entry ", g[e], " is outside [0, ", slots, ")");
}

}  // namespace

UltraMemRetrieval ultramem_retrieve(const at::Tensor& x, const UltraMemDecodeWeights& w, const UltraMemDims& d) {
  check_input(x, d);
  check_weights(w, d, x.scalar_type());
  return retrieve_unchecked(x, w, d);
}

void ultramem_prefetch_values(const UltraMemRetrieval& r, const UltraMemDecodeWeights& w, const UltraMemDims& d,
                              int64_t max_bytes) {
  check_retrieval(r, d);
  if (w.tiered) return;  // the retrieval already submitted the reads of its rows
  check_arg(w.values, "ultramem_decode: values", {d.N(), d.Dv}, {r.scores.scalar_type(), at::kBFloat16, at::kChar});
  check_arg(w.perm, "ultramem_decode: perm", {d.E * d.N()}, {at::kLong});
  const bool int8 = w.values.scalar_type() == at::kChar;
  if (int8) check_arg(w.values_scale, "ultramem_decode: values_scale", {d.N()}, {at::kFloat});
  kernels::pooled_lookup_prefetch(pool_shape(r.index.size(0), d), w.values.data_ptr(), d.Dv * int64_t(w.values.element_size()),
                                  int8 ? w.values_scale.data_ptr<float>() : nullptr, r.index.data_ptr<int64_t>(),
                                  w.perm.data_ptr<int64_t>(), max_bytes);
}

at::Tensor ultramem_lookup(const UltraMemRetrieval& r, const UltraMemDecodeWeights& w, const UltraMemDims& d) {
  check_retrieval(r, d);
  check_weights(w, d, r.scores.scalar_type());
  return lookup_unchecked(r, w, d);
}

at::Tensor ultramem_decode(const at::Tensor& x, const UltraMemDecodeWeights& w, const UltraMemDims& d,
                           at::Tensor* scores_out, at::Tensor* index_out) {
  check_input(x, d);
  check_weights(w, d, x.scalar_type());
  auto r = retrieve_unchecked(x, w, d);
  at::Tensor out = lookup_unchecked(r, w, d);
  if (scores_out) *scores_out = r.scores;
  if (index_out) *index_out = r.index;
  return out;
}

namespace {

// The registered op's arguments as the fused forward's weights and dims (shapes checked here, dtypes
// and layouts by ultramem_decode, the permutation's range here).
std::pair<UltraMemDecodeWeights, UltraMemDims> decode_op_args(
    const at::Tensor& wq, const at::Tensor& q_scale, const at::Tensor& cores, const at::Tensor& kn,
    const at::Tensor& kf, const at::Tensor& values, const c10::optional<at::Tensor>& values_scale,
    const at::Tensor& perm, const at::Tensor& wo, int64_t m, int64_t m_first, int64_t m_neg, bool rms_norm,
    const c10::optional<at::Tensor>& kn_scale, const c10::optional<at::Tensor>& kf_scale, int64_t filter_rank,
    const c10::optional<at::Tensor>& wp, const c10::optional<at::Tensor>& pre_values) {
  TORCH_CHECK(cores.dim() == 4, "ultramem_decode: cores must be [C, H, r, r], got shape ", cores.sizes());
  TORCH_CHECK(values.dim() == 2 && values.size(0) > 0 && values.size(1) > 0,
              "ultramem_decode: values must be [N, Dv], got shape ", values.sizes());
  TORCH_CHECK(kn.dim() == 3 && kn.size(2) > 0 && cores.size(1) > 0 && cores.size(2) > 0 &&
                  kn.size(1) % (cores.size(1) * cores.size(2)) == 0,
              "ultramem_decode: kn must be [2, H*r*n, Dk] with H, r from cores [C, H, r, r], got shape ", kn.sizes());
  UltraMemDims d;
  d.Dk = kn.size(2);
  d.Dv = values.size(1);
  d.C = cores.size(0);
  d.H = cores.size(1);
  d.r = cores.size(2);
  d.n = kn.size(1) / (d.H * d.r);
  TORCH_CHECK(d.n * d.n % values.size(0) == 0, "ultramem_decode: values has ", values.size(0),
              " rows, which do not divide the n*n = ", d.n * d.n, " slots (N = n*n/E)");
  d.E = d.n * d.n / values.size(0);
  TORCH_CHECK(wq.dim() == 2 && (wq.size(1) == 2 * d.Dk || wq.size(1) == 2 * d.r * d.Dk), "ultramem_decode: wq must be "
              "[D, 2*Dk] = [D, ", 2 * d.Dk, "], or with one query per rank [D, 2*r*Dk] = [D, ", 2 * d.r * d.Dk,
              "], got shape ", wq.sizes());
  d.D = wq.size(0);
  d.query_per_rank = d.r > 1 && wq.size(1) == 2 * d.r * d.Dk;
  TORCH_CHECK(wo.dim() == 2 && (wo.size(0) == d.E * d.Dv || wo.size(0) == d.Dv), "ultramem_decode: wo must be "
              "[E*Dv, D] = [", d.E * d.Dv, ", D], or with one projection [Dv, D] = [", d.Dv, ", D], got shape ", wo.sizes());
  d.single_projection = d.E > 1 && wo.size(0) == d.Dv;
  TORCH_CHECK(wp.has_value() == pre_values.has_value(), "ultramem_decode: wp and pre_values come together (pre-values)");
  if (pre_values) {
    TORCH_CHECK(pre_values->dim() == 2 && pre_values->size(1) > 0, "ultramem_decode: pre_values must be [N, Dp], got "
                "shape ", pre_values->sizes());
    d.Dp = pre_values->size(1);
  }
  d.m = m;
  d.m_first = m_first;
  d.m_neg = m_neg;
  d.filter_rank = filter_rank;
  d.rms_norm = rms_norm;
  UltraMemDecodeWeights w;
  w.wq = wq;
  w.q_scale = q_scale;
  w.cores = cores;
  w.keys.kn = kn;
  w.keys.kf = kf;
  if (kn_scale) w.keys.kn_scale = *kn_scale;
  if (kf_scale) w.keys.kf_scale = *kf_scale;
  w.values = values;
  if (values_scale) w.values_scale = *values_scale;
  w.perm = perm;
  w.wo = wo;
  if (pre_values) {
    w.wp = *wp;
    w.pre_values = *pre_values;
  }
  // The shape and dtype are checked (with the argument's name) by ultramem_decode; the range here.
  if (perm.defined() && perm.scalar_type() == at::kLong && perm.is_contiguous() && perm.numel() == d.n * d.n) {
    const std::string bad = permutation_error(perm, d.n * d.n);
    TORCH_CHECK(bad.empty(), "ultramem_decode: ", bad);
  }
  return {w, d};
}

}  // namespace

at::Tensor ultramem_decode_op(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& q_scale,
                              const at::Tensor& cores, const at::Tensor& kn, const at::Tensor& kf,
                              const at::Tensor& values, const c10::optional<at::Tensor>& values_scale,
                              const at::Tensor& perm, const at::Tensor& wo, int64_t m, int64_t m_first,
                              int64_t m_neg, bool rms_norm, const c10::optional<at::Tensor>& kn_scale,
                              const c10::optional<at::Tensor>& kf_scale, int64_t filter_rank,
                              const c10::optional<at::Tensor>& wp, const c10::optional<at::Tensor>& pre_values) {
  const auto [w, d] = decode_op_args(wq, q_scale, cores, kn, kf, values, values_scale, perm, wo, m, m_first, m_neg,
                                     rms_norm, kn_scale, kf_scale, filter_rank, wp, pre_values);
  return ultramem_decode(x, w, d);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ultramem_decode_retrieval_op(
    const at::Tensor& x, const at::Tensor& wq, const at::Tensor& q_scale, const at::Tensor& cores,
    const at::Tensor& kn, const at::Tensor& kf, const at::Tensor& values, const c10::optional<at::Tensor>& values_scale,
    const at::Tensor& perm, const at::Tensor& wo, int64_t m, int64_t m_first, int64_t m_neg, bool rms_norm,
    const c10::optional<at::Tensor>& kn_scale, const c10::optional<at::Tensor>& kf_scale, int64_t filter_rank,
    const c10::optional<at::Tensor>& wp, const c10::optional<at::Tensor>& pre_values) {
  const auto [w, d] = decode_op_args(wq, q_scale, cores, kn, kf, values, values_scale, perm, wo, m, m_first, m_neg,
                                     rms_norm, kn_scale, kf_scale, filter_rank, wp, pre_values);
  at::Tensor scores, index;
  auto out = ultramem_decode(x, w, d, &scores, &index);
  return {out, scores, index};
}

std::tuple<at::Tensor, at::Tensor> fold_filter_keys_op(const at::Tensor& kn_row, const at::Tensor& kn_col,
                                                       const at::Tensor& u, const at::Tensor& v, bool per_rank) {
  TORCH_CHECK(kn_row.dim() == 4 && kn_col.sizes() == kn_row.sizes(),
              "fold_filter_keys: kn_row and kn_col must both be [H, n, r, Dk], got ", kn_row.sizes(), " and ",
              kn_col.sizes());
  const int64_t H = kn_row.size(0), r = kn_row.size(2);
  const bool rank_r = u.dim() == 3;
  TORCH_CHECK((u.dim() == 2 || rank_r) && u.size(0) == H && u.size(-1) == r && v.sizes() == u.sizes() &&
                  (!rank_r || (u.size(1) >= 1 && u.size(1) <= r)),
              "fold_filter_keys: u and v must be [H, r] = [", H, ", ", r, "] (rank-1 filter) or [H, R, r] with 1 <= R <= r",
              " (rank-R filter), got ", u.sizes(), " and ", v.sizes());
  auto k = fold_filter_keys(kn_row, kn_col, u, v, per_rank);
  return {k.kn, k.kf};
}

}  // namespace ultramem::ops
