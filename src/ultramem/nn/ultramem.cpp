#include "ultramem/nn/ultramem.h"

#include <torch/torch.h>

#include <cmath>

#include "ultramem/nn/dtype_guard.h"
#include "ultramem/nn/rmsnorm.h"
#include "ultramem/ops/huge_page_tensor.h"
#include "ultramem/ops/ops.h"
#include "ultramem/ops/tiered_values.h"
#include "ultramem/ops/ultramem_decode.h"

namespace ultramem::nn {

UltraMemImpl::UltraMemImpl(UltraMemConfig cfg) : cfg_(std::move(cfg)) {
  cfg_.validate();
  if (cfg_.external_values) cfg_.track_stats = false;  // the telemetry reads the grid and the whole table
  const auto& c = cfg_;
  const int64_t N = c.physical_rows();
  torch::Generator gen = at::detail::createCPUGenerator(c.seed);
  auto normal = [&](std::vector<int64_t> shape, double std) {
    return at::normal(0.0, std, shape, gen);
  };
  const bool v2_init = c.value_init == ValueInit::V2;
  const double qk_scale = c.qk_scale_init > 0 ? c.qk_scale_init : std::pow(double(c.Dk), v2_init ? -0.4 : -0.33);
  double value_std = c.value_std;
  if (c.value_init == ValueInit::Paper)
    value_std = std::sqrt(double(c.E) / (2.0 * c.m * c.H * c.num_layers));
  if (v2_init)  // spec section 11: values and pre-values alike
    value_std = std::pow(0.2 * c.inner_ratio * double(c.D) /
                             (double(c.m * c.H) * (1.0 + c.score_var) * double(c.Dp * c.Dv) * double(c.num_layers)),
                         0.25);
  const double v2_linear_std = std::sqrt(2.0 / (5.0 * double(c.D)));

  wq = register_parameter("wq", normal({c.D, 2 * c.query_ranks() * c.Dk},
                                       v2_init ? v2_linear_std : 1.0 / std::sqrt(double(c.Dk))));
  q_scale = register_parameter("q_scale", torch::full({2, c.Dk}, qk_scale));
  keys = register_parameter("keys", normal({c.H, 2, c.n, c.Dk, c.r}, 1.0 / std::sqrt(double(c.Dk))));
  k_scale = register_parameter("k_scale", torch::full({2, c.Dk}, qk_scale));
  cores = register_parameter("cores", at::rand({c.C, c.H, c.r, c.r}, gen));
  // The value table and the permutation are read at random rows: they live on huge pages. Filled
  // in place (normal_ draws the same numbers as at::normal with the same generator).
  values = register_parameter("values", c.external_values ? torch::empty({0, c.Dv})
                                                          : ops::detail::empty_on_huge_pages({N, c.Dv}, torch::kFloat));
  if (c.init_values && !c.external_values) {
    torch::NoGradGuard no_grad;
    values.normal_(0.0, value_std, gen);
  }
  const int64_t G = c.projection_groups();
  wo = register_parameter("wo", normal({G * c.Dv, c.D}, v2_init ? v2_linear_std : 1.0 / std::sqrt(double(G * c.Dv))));
  if (c.Dp > 0) {  // drawn after the V1 tensors, so that a V1 layer's init is unchanged
    wp = register_parameter("wp", normal({c.D, c.Dp}, v2_init ? v2_linear_std : 1.0 / std::sqrt(double(c.D))));
    pre_values = register_parameter("pre_values", normal({N, c.Dp}, value_std));
  }

  // Fixed random permutation of the E*N grid addresses (seeded; saved with the model), or the keyed
  // Feistel bijection's materialisation (permutation_key).
  perm = register_buffer("perm", c.external_values ? torch::empty({0}, torch::kLong)
                                                    : ops::detail::empty_on_huge_pages({c.n * c.n}, torch::kLong));
  if (c.init_values && !c.external_values)
    ops::ive_permutation(c.n * c.n, c.seed, c.permutation_key, perm.data_ptr<int64_t>());
  u_vec = register_buffer("u", torch::zeros({c.H, c.r}));
  v_vec = register_buffer("v", torch::zeros({c.H, c.r}));
  if (c.track_stats && !c.external_values) hits_.assign(c.n * c.n, 0);
  infer_ = make_inference_cache();
  refresh_tucker_approx();
}

torch::Tensor UltraMemImpl::norm(const torch::Tensor& x, const torch::Tensor& scale) const {
  constexpr double eps = 1e-6;
  if (cfg_.qk_norm == NormKind::RMS) return rms_norm(x, scale, eps);
  const auto mean = x.mean(-1, true);
  const auto var = (x - mean).pow(2).mean(-1, true);
  return (x - mean) * torch::rsqrt(var + eps) * scale;
}

torch::Tensor UltraMemImpl::forward(const torch::Tensor& x) {
  const auto& c = cfg_;
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == c.D, "UltraMem: input must have shape [..., D=", c.D,
              "], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == wq.scalar_type(), "UltraMem: input dtype ", x.scalar_type(),
              " differs from the layer's ", wq.scalar_type());
  auto lead = x.sizes().vec();
  lead.pop_back();
  lead.push_back(c.D);
  // No grad and the local table: the inference fast path (ultramem_values.cpp).
  if (!at::GradMode::is_enabled() && !value_lookup_)
    return forward_inference(x.reshape({-1, c.D}).contiguous()).view(lead);
  if (at::GradMode::is_enabled() || value_lookup_) check_trainable();
  const auto u = x.reshape({-1, c.D});  // [T, D]
  const auto [s_row, s_col] = key_scores(u);                          // [T, H, r, n] each
  const auto [fu, fv] = filter_vectors();                              // [H, r] or [H, R, r]
  auto [scores, index] = ops::tdqkr(s_row, s_col, cores, fu.to(s_row.scalar_type()), fv.to(s_row.scalar_type()),
                                    c.first_stage_m(), c.m, c.filter_negatives());
  // scores: [T, H*m, C], index: [T, H*m]
  // Pre-values (V2): each kept slot's scores times <u wp, pre_values[row]>, the same for every core slice.
  const auto weights = c.Dp > 0 ? scores * pre_value_weights(u, index).unsqueeze(-1) : scores;
  auto pooled = value_lookup_ ? value_lookup_->lookup(values, index, weights, perm, c.E, c.sparse_value_grad)
                              : ops::pooled_lookup(values, index, weights, perm, c.E, c.sparse_value_grad);
  // [T, E*Dv]; one projection (V2): the E groups' pools summed first.
  if (c.single_projection) pooled = pooled.view({u.size(0), c.E, c.Dv}).sum(1);
  auto out = pooled.matmul(wo);                                        // [T, D]
  if (c.track_stats) record_stats(u, scores, index, out);
  return out.view(lead);
}

torch::Tensor UltraMemImpl::pre_value_weights(const torch::Tensor& u, const torch::Tensor& index) const {
  const auto& c = cfg_;
  const int64_t T = index.size(0), K = index.size(1);
  const auto p = u.matmul(wp);                                                      // [T, Dp]
  const auto rows = perm.index_select(0, index.reshape({-1})).remainder(c.physical_rows());  // [T*K]
  // embedding: a row-sparse gradient for the pre-values when the layer's value gradient is sparse.
  const auto pre = torch::embedding(pre_values, rows, -1, false, c.sparse_value_grad).view({T, K, c.Dp});
  return (pre * p.unsqueeze(1)).sum(-1);                                            // [T, K]
}

std::pair<torch::Tensor, torch::Tensor> UltraMemImpl::key_scores(const torch::Tensor& u) const {
  const auto& c = cfg_;
  const int64_t T = u.size(0);
  if (c.query_per_rank) {
    // V2: rank a of each side scores with its own query half: S[t, h, a, i] = <q_side[t, a], Kn[h, i, a, :]>.
    const auto q = u.matmul(wq).view({T, 2, c.r, c.Dk});              // [T, 2, r, Dk]
    const auto kt = keys.transpose(3, 4);                              // [H, 2, n, r, Dk]
    auto side = [&](int64_t s) {
      const auto qs = norm(q.select(1, s), q_scale[s]);                // [T, r, Dk]
      const auto kn = norm(kt.select(1, s), k_scale[s]);               // [H, n, r, Dk]
      return torch::einsum("tad,hiad->thai", {qs, kn}).contiguous();   // [T, H, r, n]
    };
    return {side(0), side(1)};
  }
  const auto q = u.matmul(wq);                                         // [T, 2*Dk]
  const auto q_row = norm(q.narrow(1, 0, c.Dk), q_scale[0]);           // [T, Dk]
  const auto q_col = norm(q.narrow(1, c.Dk, c.Dk), q_scale[1]);        // [T, Dk]
  // Keys normalised over Dk in every forward: [H, 2, n, Dk, r] -> norm over dim 3.
  const auto kt = keys.transpose(3, 4);                                // [H, 2, n, r, Dk]
  const auto kn_row = norm(kt.select(1, 0), k_scale[0]);               // [H, n, r, Dk]
  const auto kn_col = norm(kt.select(1, 1), k_scale[1]);               // [H, n, r, Dk]
  // S[t, h, a, i] = <q, Kn[h, i, a, :]>
  auto score_side = [&](const torch::Tensor& qs, const torch::Tensor& kn) {
    const auto k2 = kn.permute({0, 2, 1, 3}).reshape({c.H * c.r * c.n, c.Dk});  // [(H r n), Dk]
    return qs.matmul(k2.t()).view({T, c.H, c.r, c.n});
  };
  return {score_side(q_row, kn_row), score_side(q_col, kn_col)};
}

void UltraMemImpl::measure_retrieval(const torch::Tensor& u, const torch::Tensor& scores, const torch::Tensor& index) {
  const auto& c = cfg_;
  const int64_t k = std::min<int64_t>(u.size(0), c.retrieval_sample - window_.retrieval_tokens);
  if (k <= 0) return;
  const auto [s_row, s_col] = key_scores(u.narrow(0, 0, k).to(wq.scalar_type()));
  auto [exact_scores, exact_index] = ops::tdqkr_exact(s_row, s_col, cores.detach(), c.m);
  const auto kept = index.narrow(0, 0, k).reshape({k, c.H, c.m, 1});   // [k, H, m, 1]
  const auto truth = exact_index.reshape({k, c.H, 1, c.m});            // [k, H, 1, m]
  window_.retrieval_found += kept.eq(truth).any(-1).sum().item<int64_t>();
  window_.retrieval_slots += k * c.H * c.m;
  window_.mass_kept += scores.narrow(0, 0, k).to(torch::kDouble).sum().item<double>();
  window_.mass_exact += exact_scores.to(torch::kDouble).sum().item<double>();
  if (key_format_ != ValueFormat::kFloat32 && !at::GradMode::is_enabled()) {
    // What the float keys keep, for the compact keys' agreement.
    const auto dt = s_row.scalar_type();
    const auto [fu, fv] = filter_vectors();
    auto [f_scores, f_index] = ops::tdqkr(s_row, s_col, cores.detach(), fu.to(dt), fv.to(dt), c.first_stage_m(), c.m,
                                          c.filter_negatives());
    window_.key_same += kept.eq(f_index.reshape({k, c.H, 1, c.m})).any(-1).sum().item<int64_t>();
  }
  window_.retrieval_tokens += k;
}

void UltraMemImpl::set_filter(RetrievalFilter filter, int64_t m_neg, int64_t m_first, int64_t filter_rank) {
  UltraMemConfig c = cfg_;
  c.filter = filter;
  c.m_neg = m_neg;
  c.filter_rank = filter_rank;
  if (m_first > 0) c.m_first = m_first;
  c.validate();
  cfg_ = c;
  invalidate_inference_cache();  // the folded filter keys depend on the filter
}

std::pair<torch::Tensor, torch::Tensor> UltraMemImpl::filter_vectors() const {
  const int64_t R = cfg_.filter_vectors();
  if (R == 0) return {u_vec.detach(), v_vec.detach()};
  torch::NoGradGuard no_grad;
  const auto csum = cores.detach().sum(0).to(torch::kDouble);          // [H, r, r]
  auto [U, S, Vh] = torch::linalg_svd(csum, /*full_matrices=*/false);  // U [H, r, r], S [H, r], Vh [H, r, r]
  const auto w = S.narrow(1, 0, R).clamp_min(0).sqrt().unsqueeze(2);   // [H, R, 1]
  const auto u = U.narrow(2, 0, R).transpose(1, 2) * w;                // [H, R, r]
  const auto v = Vh.narrow(1, 0, R) * w;                               // [H, R, r]
  const auto dt = cores.scalar_type();
  return {u.to(dt).contiguous(), v.to(dt).contiguous()};
}

torch::Tensor UltraMemImpl::aux_loss() const {
  const auto& c = cfg_;
  if (!c.aux_loss || c.r < 2) return torch::zeros({}, cores.options());
  const auto csum = cores.sum(0);                        // [H, r, r]
  const auto sv = torch::linalg_svdvals(csum);           // [H, r], descending
  const auto tail = torch::relu(sv.narrow(1, 1, c.r - 1) - c.aux_tau);
  const auto per_head = tail.pow(2).sum(1) * (c.aux_alpha / double(c.r - 1));  // [H]
  return c.aux_reduction == AuxReduction::kMean ? per_head.mean() : per_head.sum();
}

void UltraMemImpl::refresh_tucker_approx() {
  torch::NoGradGuard no_grad;
  const auto& c = cfg_;
  const auto csum = cores.detach().sum(0).to(torch::kDouble);  // [H, r, r]
  auto [U, S, Vh] = torch::linalg_svd(csum, /*full_matrices=*/false);
  auto u_new = U.select(2, 0);   // [H, r]
  auto v_new = Vh.select(1, 0);  // [H, r]
  const auto u_old = u_vec.to(torch::kDouble), v_old = v_vec.to(torch::kDouble);
  for (int64_t h = 0; h < c.H; ++h) {
    auto un = u_new[h], vn = v_new[h];
    const bool first = u_old[h].abs().sum().item<double>() == 0 && v_old[h].abs().sum().item<double>() == 0;
    bool flip;
    if (first) {
      flip = (un.sum() + vn.sum()).item<double>() < 0;  // no history: prefer the positive orientation
    } else {
      const double keep = (un - u_old[h]).abs().sum().item<double>() + (vn - v_old[h]).abs().sum().item<double>();
      const double flipped = (-un - u_old[h]).abs().sum().item<double>() + (-vn - v_old[h]).abs().sum().item<double>();
      flip = flipped < keep;
    }
    if (flip) {
      un.neg_();
      vn.neg_();
    }
  }
  u_vec.copy_(u_new);
  v_vec.copy_(v_new);
  core_l1_ = S.select(1, 0).mean().item<double>();
  core_l2_ = c.r >= 2 ? S.select(1, 1).mean().item<double>() : 0.0;
  invalidate_inference_cache();  // an optimizer step may have written the keys without a version bump
}

void UltraMemImpl::record_stats(const torch::Tensor& u, const torch::Tensor& scores, const torch::Tensor& index,
                                const torch::Tensor& out) {
  torch::NoGradGuard no_grad;
  const auto& c = cfg_;
  const int64_t T = index.size(0);
  if (T == 0) return;
  if (c.retrieval_sample > 0) measure_retrieval(u.detach(), scores.detach(), index);
  const auto idx = index.contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t e = 0; e < idx.numel(); ++e) ++hits_[ip[e]];
  const auto total = scores.detach().sum(-1).view({T, c.H, c.m}).to(torch::kDouble);  // [T, H, m]
  window_.top1_score += total.select(2, 0).sum().item<double>();
  window_.topm_score += total.sum().item<double>();
  window_.tokens += T;
  window_.output_std = out.detach().to(torch::kDouble).std().item<double>();
  if (window_.tokens >= c.stats_window) {
    last_ = stats();
    reset_stats();
  }
}

MemoryStats UltraMemImpl::stats() const {
  const auto& c = cfg_;
  MemoryStats s;
  s.core_l1 = core_l1_;
  s.core_l2 = core_l2_;
  if (window_.tokens == 0) {
    if (last_.tokens > 0) {
      s = last_;
      s.core_l1 = core_l1_;
      s.core_l2 = core_l2_;
    }
    return s;
  }
  s.tokens = window_.tokens;
  s.retrieval_tokens = window_.retrieval_tokens;
  if (window_.retrieval_slots > 0) {
    s.recall = double(window_.retrieval_found) / double(window_.retrieval_slots);
    s.score_mass = window_.mass_exact != 0 ? window_.mass_kept / window_.mass_exact : 1.0;
    if (key_format_ != ValueFormat::kFloat32) s.key_agreement = double(window_.key_same) / double(window_.retrieval_slots);
  }
  s.output_std = window_.output_std;
  s.top1_score = window_.top1_score / double(window_.tokens * c.H);
  s.topm_score = window_.topm_score / double(window_.tokens * c.H * c.m);
  const double slots = double(hits_.size());
  double total = 0, hit_slots = 0;
  for (int32_t h : hits_) {
    total += h;
    hit_slots += h > 0;
  }
  double kl = 0;
  for (int32_t h : hits_)
    if (h > 0) {
      const double p = h / total;
      kl += p * std::log(p * slots);
    }
  s.coverage = hit_slots / slots;
  s.kl_uniform = kl;
  return s;
}

void UltraMemImpl::reset_stats() {
  std::fill(hits_.begin(), hits_.end(), 0);
  window_ = MemoryStats{};
}

// A bf16 / int8 value table (and its scales) keeps its storage format through dtype conversions. A
// converted read-only (mapped) float table is an owned copy afterwards.
template <typename Fn>
void UltraMemImpl::keep_stored_values(Fn&& convert) {
  const void* before = values.data_ptr();
  if (format_ == ValueFormat::kFloat32) {
    convert();
    if (values.data_ptr() != before) values_read_only_ = false;
    return;
  }
  const torch::Tensor v = values.detach(), scale = values_scale.defined() ? values_scale.detach() : torch::Tensor();
  convert();
  values.set_data(v);
  if (scale.defined()) values_scale.set_data(scale);
}

void UltraMemImpl::to(torch::Dtype dtype, bool non_blocking) {
  keep_stored_values([&] { detail::keep_integer_buffers(*this, [&] { Module::to(dtype, non_blocking); }); });
}
void UltraMemImpl::to(torch::Device device, torch::Dtype dtype, bool non_blocking) {
  keep_stored_values([&] { detail::keep_integer_buffers(*this, [&] { Module::to(device, dtype, non_blocking); }); });
}
void UltraMemImpl::to(torch::Device device, bool non_blocking) { Module::to(device, non_blocking); }

}  // namespace ultramem::nn
