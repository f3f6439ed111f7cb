// UltraMemImpl, inference side: the no-grad fast path of forward() and the value-table storage
// formats (float32 / bf16 / int8 with per-row scales, memory-mapped tables).
//
// The fast path computes what the autograd path computes, on raw buffers:
//   q = u @ Wq, q_row / q_col normalised with their scales        (few rows: kernels::matmul_rows)
//   TDQKR's rank-1 filter with folded keys: f_row = u^T S_row = q_row @ Kf_row^T, where
//     Kf_row[h, i] = sum_a u[h, a] Kn_row[h, a, i] is cached with the normalised keys (u, v are
//     constants between optimizer steps), so the key scan reads H*n instead of H*r*n key rows;
//   the exact S_row[h, a, i] only for the m_first kept rows i (kernels::gathered_dots), then TDQKR's
//     exact rescoring (kernels::tdqkr_rescore), the pooled lookup over the stored table, out = pooled @ Wo.
// Larger batches use libtorch's matmul (BLAS) for the three products, into preallocated buffers. The
// result equals the autograd path's up to float rounding; where two filter scores tie to within
// rounding the kept candidate may differ.
#include <torch/torch.h>

#include <cmath>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "ultramem/kernels/pooled_lookup.h"
#include "ultramem/kernels/small_matmul.h"
#include "ultramem/kernels/tdqkr.h"
#include "ultramem/kernels/value_quant.h"
#include "ultramem/nn/huge_page_tensor.h"
#include "ultramem/nn/ultramem.h"

namespace ultramem::nn {

// Normalised keys, computed once per change of keys / k_scale (by tensor version and data pointer),
// and the check that the permutation holds valid addresses, once per permutation.
struct UltraMemImpl::InferenceCache {
  std::mutex mu;
  torch::Tensor kn;            // [2, H*r*n, Dk] normalised keys (row side, col side), rows ordered (h, a, i)
  torch::Tensor kf;            // [2, H*n, Dk]   filter keys: sum_a u[h, a] Kn_row[h, a, i]; v for the col side
  const void* keys_ptr = nullptr;
  const void* k_scale_ptr = nullptr;
  const void* u_ptr = nullptr;
  const void* v_ptr = nullptr;
  int64_t keys_version = -1, k_scale_version = -1, u_version = -1, v_version = -1;
  const void* perm_ptr = nullptr;  // permutation that passed the range check
  int64_t perm_version = -1;
  bool valid = false;
};

std::shared_ptr<UltraMemImpl::InferenceCache> UltraMemImpl::make_inference_cache() {
  return std::make_shared<InferenceCache>();
}

namespace {

// Below these batch sizes the few-row kernels beat BLAS on this project's shapes (measured with
// Dk = 128, n = 512..4096, D = 512, E*Dv = 1024; docs/performance.md, "Inference path").
constexpr int64_t kSmallRowsProjection = 8;  // q = u @ Wq and out = pooled @ Wo
constexpr int64_t kSmallRowsScores = 16;     // key scoring

// Version counter of a tensor; inference tensors have none (then only the data pointer is compared).
int64_t version_of(const torch::Tensor& t) { return t.is_inference() ? -1 : int64_t(t._version()); }

// Per-thread scratch buffers, reused across calls (no allocation once grown).
template <typename S>
struct Scratch {
  std::vector<S> q, qr, qc, f_row, f_col, s_row, s_col, scores, pooled, dots, ones;
  std::vector<int32_t> irow, icol, rows;
  std::vector<int64_t> index;
};
template <typename S>
Scratch<S>& scratch() {
  thread_local Scratch<S> s;
  return s;
}
template <typename V>
V* sized(std::vector<V>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  return v.data();
}

template <typename S>
constexpr torch::Dtype dtype_of() {
  return std::is_same_v<S, float> ? torch::kFloat : torch::kDouble;
}

// out[rows, N] = x[rows, K] @ w[K, N] (w contiguous): the few-row kernel or BLAS.
template <typename S>
void project(const S* x, int64_t rows, int64_t K, const torch::Tensor& w, S* out) {
  const int64_t N = w.size(1);
  if (rows <= kSmallRowsProjection) {
    kernels::matmul_rows<S>(rows, K, N, x, w.data_ptr<S>(), out);
    return;
  }
  const auto o = torch::TensorOptions().dtype(dtype_of<S>());
  torch::Tensor dst = torch::from_blob(out, {rows, N}, o);
  at::mm_out(dst, torch::from_blob(const_cast<S*>(x), {rows, K}, o), w);
}

// Normalises x[0:Dk] in place (RMS or Layer, eps 1e-6 as the autograd path) and scales it.
template <typename S>
void normalise(S* x, int64_t Dk, const S* scale, NormKind kind) {
  constexpr double eps = 1e-6;
  if (kind == NormKind::RMS) {
    double ss = 0;
    for (int64_t i = 0; i < Dk; ++i) ss += double(x[i]) * double(x[i]);
    const S r = S(1.0 / std::sqrt(ss / double(Dk) + eps));
    for (int64_t i = 0; i < Dk; ++i) x[i] = x[i] * r * scale[i];
    return;
  }
  double mean = 0;
  for (int64_t i = 0; i < Dk; ++i) mean += double(x[i]);
  mean /= double(Dk);
  double var = 0;
  for (int64_t i = 0; i < Dk; ++i) var += (double(x[i]) - mean) * (double(x[i]) - mean);
  const S r = S(1.0 / std::sqrt(var / double(Dk) + eps));
  for (int64_t i = 0; i < Dk; ++i) x[i] = (x[i] - S(mean)) * r * scale[i];
}

std::string shape_str(const torch::Tensor& t) {
  std::string s = "[";
  for (int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + std::to_string(t.size(d));
  return s + "]";
}

}  // namespace

// ---- value formats ------------------------------------------------------------------------------

int64_t UltraMemImpl::value_bytes() const {
  int64_t b = values.numel() * int64_t(values.element_size());
  if (format_ == ValueFormat::kInt8 && values_scale.defined()) b += values_scale.numel() * int64_t(values_scale.element_size());
  return b;
}

void UltraMemImpl::check_trainable() const {
  if (format_ != ValueFormat::kFloat32)
    throw std::logic_error(std::string("UltraMem: the value table is stored as ") + to_string(format_) +
                           " for inference; a forward with grad mode on (training) needs float32 values. Run "
                           "inference under torch::NoGradGuard or torch::InferenceMode, or train from the "
                           "float32 checkpoint");
  if (values_read_only_)
    throw std::logic_error(
        "UltraMem: the value table is a read-only memory mapping (inference only); a forward with grad mode on "
        "(training) needs the table loaded into memory (load the checkpoint without mmap)");
}

void UltraMemImpl::invalidate_inference_cache() {
  if (!infer_) return;
  std::lock_guard<std::mutex> lock(infer_->mu);
  infer_->valid = false;
  infer_->perm_ptr = nullptr;
}

void UltraMemImpl::train(bool on) {
  Module::train(on);
  invalidate_inference_cache();
}

void UltraMemImpl::set_value_format(ValueFormat f) {
  if (f == format_) return;
  if (value_lookup_)
    throw std::logic_error("UltraMem::set_value_format: a value lookup is installed (sharded table); only float32 "
                           "tables can be sharded");
  if (format_ == ValueFormat::kInt8 || (format_ == ValueFormat::kBFloat16 && f == ValueFormat::kInt8))
    throw std::logic_error(std::string("UltraMem::set_value_format: cannot convert a ") + to_string(format_) +
                           " value table to " + to_string(f) + "; quantise from the float32 weights instead");
  if (format_ == ValueFormat::kFloat32 && values.scalar_type() != torch::kFloat)
    throw std::logic_error(std::string("UltraMem::set_value_format: quantising needs a float32 value table, the "
                                       "layer's is ") +
                           c10::toString(values.scalar_type()));
  torch::NoGradGuard no_grad;
  const int64_t N = values.size(0), Dv = values.size(1);
  const torch::Tensor src = values.detach().contiguous();
  torch::Tensor dst, scale;
  if (f == ValueFormat::kBFloat16) {
    dst = detail::empty_on_huge_pages({N, Dv}, torch::kBFloat16);
    kernels::quantize_bf16(src.data_ptr<float>(), N * Dv, reinterpret_cast<uint16_t*>(dst.data_ptr()));
  } else if (f == ValueFormat::kInt8) {
    dst = detail::empty_on_huge_pages({N, Dv}, torch::kChar);
    scale = detail::empty_on_huge_pages({N}, torch::kFloat);
    const int64_t bad = kernels::quantize_int8_rows(src.data_ptr<float>(), N, Dv, dst.data_ptr<int8_t>(),
                                                    scale.data_ptr<float>());
    if (bad >= 0)
      throw std::invalid_argument("UltraMem::set_value_format: value row " + std::to_string(bad) +
                                  " holds a non-finite value; it cannot be quantised to int8");
  } else {  // bf16 -> float32, exact
    dst = detail::empty_on_huge_pages({N, Dv}, torch::kFloat);
    kernels::dequantize_bf16(reinterpret_cast<const uint16_t*>(src.data_ptr()), N * Dv, dst.data_ptr<float>());
  }
  set_value_table(dst, scale, /*read_only=*/false);
}

void UltraMemImpl::set_value_table(torch::Tensor v, torch::Tensor scale, bool read_only) {
  const int64_t N = cfg_.physical_rows(), Dv = cfg_.Dv;
  const std::string who = "UltraMem::set_value_table: ";
  if (!v.defined() || v.dim() != 2 || v.size(0) != N || v.size(1) != Dv || !v.is_contiguous() || !v.device().is_cpu())
    throw std::invalid_argument(who + "values must be a contiguous CPU tensor [N, Dv] = [" + std::to_string(N) + ", " +
                                std::to_string(Dv) + "], got " + (v.defined() ? shape_str(v) : "undefined"));
  ValueFormat f;
  if (v.scalar_type() == torch::kBFloat16) {
    f = ValueFormat::kBFloat16;
  } else if (v.scalar_type() == torch::kChar) {
    f = ValueFormat::kInt8;
  } else if (v.scalar_type() == wq.scalar_type()) {
    f = ValueFormat::kFloat32;
  } else {
    throw std::invalid_argument(who + "values must be bfloat16, int8 or the layer's " +
                                c10::toString(wq.scalar_type()) + ", got " + c10::toString(v.scalar_type()));
  }
  if (f == ValueFormat::kInt8) {
    if (!scale.defined() || scale.dim() != 1 || scale.size(0) != N || scale.scalar_type() != torch::kFloat ||
        !scale.is_contiguous() || !scale.device().is_cpu())
      throw std::invalid_argument(who + "int8 values need a contiguous float32 CPU scale [N] = [" +
                                  std::to_string(N) + "], got " +
                                  (scale.defined() ? shape_str(scale) + " " + c10::toString(scale.scalar_type())
                                                   : std::string("none")));
  } else if (scale.defined()) {
    throw std::invalid_argument(who + "a row scale belongs to int8 values only");
  }
  if (format_ == ValueFormat::kInt8 && f != ValueFormat::kInt8)
    throw std::logic_error(who + "an int8 value table cannot be replaced by a " + to_string(f) +
                           " one (its scale buffer is part of the module); build a new layer");
  if (value_lookup_ && f != ValueFormat::kFloat32)
    throw std::logic_error(who + "a value lookup is installed (sharded table); only float32 tables can be sharded");
  torch::NoGradGuard no_grad;
  values.mutable_grad() = torch::Tensor();
  values.set_requires_grad(false);
  values.set_data(v);
  values.set_requires_grad(f == ValueFormat::kFloat32 && !read_only);
  if (f == ValueFormat::kInt8) {
    if (values_scale.defined())
      values_scale.set_data(scale);
    else
      values_scale = register_buffer("values_scale", scale);
  }
  format_ = f;
  values_read_only_ = read_only;
}

// ---- the fast path ------------------------------------------------------------------------------

torch::Tensor UltraMemImpl::forward_inference(const torch::Tensor& u) {
  const int64_t T = u.size(0);
  torch::Tensor out = torch::empty({T, cfg_.D}, u.options());
  if (T == 0) return out;
  if (u.scalar_type() == torch::kFloat) {
    forward_inference_impl<float>(u.data_ptr<float>(), T, out.data_ptr<float>());
  } else if (u.scalar_type() == torch::kDouble) {
    forward_inference_impl<double>(u.data_ptr<double>(), T, out.data_ptr<double>());
  } else {
    throw std::invalid_argument(std::string("UltraMem: input dtype must be float32 or float64, got ") +
                                c10::toString(u.scalar_type()));
  }
  return out;
}

template <typename S>
void UltraMemImpl::forward_inference_impl(const S* u, int64_t T, S* out) {
  const auto& c = cfg_;
  const int64_t Dk = c.Dk, HRn = c.H * c.r * c.n, K = c.H * c.m, N = c.physical_rows();
  const auto st = dtype_of<S>();
  if (format_ == ValueFormat::kFloat32 && values.scalar_type() != st)
    throw std::invalid_argument(std::string("UltraMem: the value table is ") + c10::toString(values.scalar_type()) +
                                ", the layer computes in " + c10::toString(st));

  // Normalised keys [2, H*r*n, Dk] and filter keys [2, H*n, Dk], cached; the permutation's range
  // checked once.
  torch::Tensor kn, kf;
  {
    auto& ic = *infer_;
    std::lock_guard<std::mutex> lock(ic.mu);
    if (!ic.valid || ic.kn.scalar_type() != st || ic.keys_ptr != keys.data_ptr() ||
        ic.k_scale_ptr != k_scale.data_ptr() || ic.keys_version != version_of(keys) ||
        ic.k_scale_version != version_of(k_scale) || ic.u_ptr != u_vec.data_ptr() ||
        ic.v_ptr != v_vec.data_ptr() || ic.u_version != version_of(u_vec) || ic.v_version != version_of(v_vec)) {
      const auto kt = keys.detach().transpose(3, 4);                       // [H, 2, n, r, Dk]
      const auto ks = k_scale.detach();
      const auto kn_row = norm(kt.select(1, 0), ks[0]).permute({0, 2, 1, 3});  // [H, r, n, Dk]
      const auto kn_col = norm(kt.select(1, 1), ks[1]).permute({0, 2, 1, 3});
      ic.kn = torch::stack({kn_row, kn_col}).reshape({2, HRn, Dk}).contiguous();
      const auto w = torch::stack({u_vec.detach(), v_vec.detach()}).to(st).view({2, c.H, c.r, 1, 1});
      ic.kf = (ic.kn.view({2, c.H, c.r, c.n, Dk}) * w).sum(2).reshape({2, c.H * c.n, Dk}).contiguous();
      ic.keys_ptr = keys.data_ptr();
      ic.k_scale_ptr = k_scale.data_ptr();
      ic.u_ptr = u_vec.data_ptr();
      ic.v_ptr = v_vec.data_ptr();
      ic.keys_version = version_of(keys);
      ic.k_scale_version = version_of(k_scale);
      ic.u_version = version_of(u_vec);
      ic.v_version = version_of(v_vec);
      ic.valid = true;
    }
    if (ic.perm_ptr != perm.data_ptr() || ic.perm_version != version_of(perm)) {
      if (perm.scalar_type() != torch::kLong || !perm.is_contiguous() || perm.numel() != c.n * c.n)
        throw std::runtime_error("UltraMem: the permutation must be a contiguous int64 tensor [n*n]");
      const int64_t* p = perm.data_ptr<int64_t>();
      for (int64_t g = 0; g < c.n * c.n; ++g)
        if (p[g] < 0 || p[g] >= c.n * c.n)
          throw std::runtime_error("UltraMem: perm[" + std::to_string(g) + "] = " + std::to_string(p[g]) +
                                   " is outside [0, n*n); corrupt weights?");
      ic.perm_ptr = perm.data_ptr();
      ic.perm_version = version_of(perm);
    }
    kn = ic.kn;
    kf = ic.kf;
  }
  const torch::Tensor wq_c = wq.is_contiguous() ? wq : wq.contiguous();
  const torch::Tensor wo_c = wo.is_contiguous() ? wo : wo.contiguous();
  const torch::Tensor qs = q_scale.contiguous(), cores_c = cores.contiguous();

  auto& sc = scratch<S>();
  S* q = sized(sc.q, T * 2 * Dk);
  S* qr = sized(sc.qr, T * Dk);
  S* qc = sized(sc.qc, T * Dk);
  S* s_row = sized(sc.s_row, T * HRn);
  S* s_col = sized(sc.s_col, T * HRn);
  S* scores = sized(sc.scores, T * K * c.C);
  int64_t* index = sized(sc.index, T * K);
  S* pooled = sized(sc.pooled, T * c.E * c.Dv);

  // Query and its two normalised halves.
  project<S>(u, T, c.D, wq_c, q);
  const S* qscale = qs.data_ptr<S>();
  for (int64_t t = 0; t < T; ++t) {
    std::copy(q + t * 2 * Dk, q + t * 2 * Dk + Dk, qr + t * Dk);
    std::copy(q + t * 2 * Dk + Dk, q + (t + 1) * 2 * Dk, qc + t * Dk);
    normalise(qr + t * Dk, Dk, qscale, c.qk_norm);
    normalise(qc + t * Dk, Dk, qscale + Dk, c.qk_norm);
  }
  // TDQKR, stage 1: filter scores against the folded keys, f_side[t, h, i], and the top m_first.
  const int64_t Hn = c.H * c.n, m1 = c.first_stage_m();
  S* f_row = sized(sc.f_row, T * Hn);
  S* f_col = sized(sc.f_col, T * Hn);
  const S* kf_row = kf.data_ptr<S>();
  const S* kf_col = kf_row + Hn * Dk;
  if (T <= kSmallRowsScores) {
    kernels::matmul_rows_nt<S>(T, Dk, Hn, qr, kf_row, f_row);
    kernels::matmul_rows_nt<S>(T, Dk, Hn, qc, kf_col, f_col);
  } else {
    const auto o = torch::TensorOptions().dtype(st);
    torch::Tensor d_row = torch::from_blob(f_row, {T, Hn}, o), d_col = torch::from_blob(f_col, {T, Hn}, o);
    at::mm_out(d_row, torch::from_blob(qr, {T, Dk}, o), kf[0].t());
    at::mm_out(d_col, torch::from_blob(qc, {T, Dk}, o), kf[1].t());
  }
  kernels::TdqkrShape ts;
  ts.T = T;
  ts.H = c.H;
  ts.r = c.r;
  ts.n = c.n;
  ts.C = c.C;
  ts.m_first = m1;
  ts.m = c.m;
  kernels::TdqkrShape fs = ts;  // the filter on f as a rank-1 problem with weights 1 (f = 0 + 1 * f exactly)
  fs.r = 1;
  S* ones = sized(sc.ones, c.H);
  std::fill(ones, ones + c.H, S(1));
  int32_t* irow = sized(sc.irow, T * c.H * m1);
  int32_t* icol = sized(sc.icol, T * c.H * m1);
  kernels::tdqkr_filter<S>(fs, f_row, f_col, ones, ones, irow, icol);
  // Stage 2: exact S_side[t, h, a, i] at the kept rows only (the rescoring reads nothing else), then
  // the exact rescoring with every core.
  const S* kn_row = kn.data_ptr<S>();
  const S* kn_col = kn_row + HRn * Dk;
  S* dots = sized(sc.dots, m1);
  int32_t* rows = sized(sc.rows, m1);
  auto exact = [&](const S* qs, const S* table, const int32_t* kept, S* S_side) {
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < c.H; ++h) {
        const int32_t* k = kept + (t * c.H + h) * m1;
        for (int64_t a = 0; a < c.r; ++a) {
          const int32_t base = int32_t((h * c.r + a) * c.n);
          for (int64_t x = 0; x < m1; ++x) rows[x] = base + k[x];
          kernels::gathered_dots<S>(Dk, qs + t * Dk, table, rows, m1, dots);
          S* dst = S_side + ((t * c.H + h) * c.r + a) * c.n;
          for (int64_t x = 0; x < m1; ++x) dst[k[x]] = dots[x];
        }
      }
  };
  exact(qr, kn_row, irow, s_row);
  exact(qc, kn_col, icol, s_col);
  kernels::tdqkr_rescore<S>(ts, s_row, s_col, cores_c.data_ptr<S>(), irow, icol, scores, index);
  // Pooled lookup over the stored table.
  kernels::PoolShape ps;
  ps.T = T;
  ps.K = K;
  ps.N = N;
  ps.Dv = c.Dv;
  ps.E = c.E;
  ps.C = c.C;
  const int64_t* pp = perm.data_ptr<int64_t>();
  switch (format_) {
    case ValueFormat::kFloat32:
      kernels::pooled_lookup_forward<S>(ps, values.data_ptr<S>(), index, scores, pp, pooled);
      break;
    case ValueFormat::kBFloat16:
      kernels::pooled_lookup_forward_bf16<S>(ps, reinterpret_cast<const uint16_t*>(values.data_ptr()), index, scores,
                                             pp, pooled);
      break;
    case ValueFormat::kInt8:
      kernels::pooled_lookup_forward_int8<S>(ps, values.data_ptr<int8_t>(), values_scale.data_ptr<float>(), index,
                                             scores, pp, pooled);
      break;
  }
  // Output projection.
  project<S>(pooled, T, c.E * c.Dv, wo_c, out);
  if (c.track_stats) record_stats_raw<S>(scores, index, T, out);
}

template <typename S>
void UltraMemImpl::record_stats_raw(const S* scores, const int64_t* index, int64_t T, const S* out) {
  const auto& c = cfg_;
  const int64_t K = c.H * c.m;
  for (int64_t e = 0; e < T * K; ++e) ++hits_[index[e]];
  double top1 = 0, topm = 0;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < c.H; ++h)
      for (int64_t k = 0; k < c.m; ++k) {
        double total = 0;
        for (int64_t cc = 0; cc < c.C; ++cc) total += double(scores[((t * K) + h * c.m + k) * c.C + cc]);
        topm += total;
        if (k == 0) top1 += total;
      }
  window_.top1_score += top1;
  window_.topm_score += topm;
  window_.tokens += T;
  const int64_t n_out = T * c.D;
  double mean = 0, ss = 0;
  for (int64_t i = 0; i < n_out; ++i) mean += double(out[i]);
  mean /= double(n_out);
  for (int64_t i = 0; i < n_out; ++i) ss += (double(out[i]) - mean) * (double(out[i]) - mean);
  window_.output_std = n_out > 1 ? std::sqrt(ss / double(n_out - 1)) : std::nan("");
  if (window_.tokens >= c.stats_window) {
    last_ = stats();
    reset_stats();
  }
}

template void UltraMemImpl::forward_inference_impl<float>(const float*, int64_t, float*);
template void UltraMemImpl::forward_inference_impl<double>(const double*, int64_t, double*);

}  // namespace ultramem::nn
