// UltraMemImpl, inference side: the value-table storage formats (float32 / bf16 / int8 with per-row
// scales, memory-mapped tables) and the no-grad forward, which calls the fused op
// ops::ultramem_decode (ops/ultramem_decode.h) with the layer's cached normalised keys.
#include <torch/torch.h>

#include <cmath>
#include <mutex>
#include <tuple>
#include <stdexcept>
#include <string>
#include <vector>

#include "ultramem/ops/huge_page_tensor.h"
#include "ultramem/ops/ultramem_decode.h"
#include "ultramem/nn/ultramem.h"
#include "ultramem/nn/value_table.h"

namespace ultramem::nn {

// Normalised keys, computed once per change of keys / k_scale (by tensor version and data pointer),
// and the check that the permutation holds valid addresses, once per permutation.
struct UltraMemImpl::InferenceCache {
  std::mutex mu;
  ops::UltraMemDecodeKeys keys;  // normalised and folded keys (ops/ultramem_decode.h), in key_format_
  at::ScalarType compute = at::ScalarType::Undefined;  // the dtype they were prepared for
  const void* keys_ptr = nullptr;
  const void* k_scale_ptr = nullptr;
  const void* u_ptr = nullptr;
  const void* v_ptr = nullptr;
  int64_t keys_version = -1, k_scale_version = -1, u_version = -1, v_version = -1;
  const void* cores_ptr = nullptr;  // the rank_r filter's vectors come from the cores
  int64_t cores_version = -1;
  const void* perm_ptr = nullptr;  // permutation that passed the range check
  int64_t perm_version = -1;
  bool valid = false;
};

std::shared_ptr<UltraMemImpl::InferenceCache> UltraMemImpl::make_inference_cache() {
  return std::make_shared<InferenceCache>();
}

namespace {

// Version counter of a tensor; inference tensors have none (then only the data pointer is compared).
int64_t version_of(const torch::Tensor& t) { return t.is_inference() ? -1 : int64_t(t._version()); }

}  // namespace

// ---- value formats ------------------------------------------------------------------------------

int64_t UltraMemImpl::value_bytes() const {
  int64_t b = values.numel() * int64_t(values.element_size());
  if (format_ == ValueFormat::kInt8 && values_scale.defined()) b += values_scale.numel() * int64_t(values_scale.element_size());
  return b;
}

namespace {

// UltraMemV2's pre-values stay in memory and are read through the stored permutation, which a layer with
// external values does not hold.
void refuse_pre_values_without_permutation(const UltraMemConfig& c, const char* who) {
  if (c.Dp > 0 && c.external_values)
    throw std::logic_error(std::string(who) + ": this layer has UltraMemV2 pre-values, which are read through the "
                           "stored permutation; a layer with external values holds none (keep its permutation)");
}

}  // namespace

void UltraMemImpl::set_tiered_values(std::shared_ptr<ops::TieredValues> tiered) {
  if (tiered) refuse_pre_values_without_permutation(cfg_, "UltraMem::set_tiered_values");
  if (tiered && value_lookup_)
    throw std::logic_error("UltraMem::set_tiered_values: a value lookup is installed (sharded table)");
  if (tiered) {
    const auto& c = cfg_;
    auto bad = [&](const std::string& what) {
      throw std::invalid_argument("UltraMem: the value table " + tiered->path() + " " + what);
    };
    if (tiered->rows() != c.physical_rows() || tiered->dv() != c.Dv)
      bad("holds " + std::to_string(tiered->rows()) + " rows of " + std::to_string(tiered->dv()) +
          " values; this layer needs " + std::to_string(c.physical_rows()) + " rows (n*n/E) of Dv = " +
          std::to_string(c.Dv));
    if (tiered->E() != c.E) bad("was opened for E = " + std::to_string(tiered->E()) + "; the layer has E = " + std::to_string(c.E));
    const auto& key = tiered->feistel_key();
    if (key && c.permutation_key != 0 && *key != c.permutation_key)
      bad("is read with the Feistel key " + std::to_string(*key) + " but the layer's permutation_key is " +
          std::to_string(c.permutation_key));
    if (!key && c.external_values)
      bad("has no Feistel key, and this layer holds no stored permutation (external values)");
    if (key && !c.external_values && c.permutation_key == 0) {
      const std::string why = ops::feistel_mismatch(perm, c.n * c.n, *key);
      if (!why.empty()) bad("is read with a Feistel key that is not this layer's permutation: " + why);
    }
  }
  tiered_ = std::move(tiered);
}

void UltraMemImpl::check_trainable() const {
  if (cfg_.external_values && !tiered_)
    throw std::logic_error("UltraMem: the layer's value table is external (not in memory); it runs no-grad forwards "
                           "with its table file installed (set_tiered_values) only");
  if (tiered_)
    throw std::logic_error("UltraMem: the value table is served from the file " + tiered_->path() +
                           " (inference only); a forward with grad mode on (training) needs the table in memory");
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

void UltraMemImpl::set_key_format(ValueFormat f) {
  if (f == key_format_) return;
  if (value_lookup_)
    throw std::logic_error(std::string("UltraMem: ") + to_string(f) +
                           " keys need the fused local path, but this layer's value table is looked up through "
                           "set_value_lookup (e.g. sharded); consolidate the checkpoint first");
  key_format_ = f;
  invalidate_inference_cache();
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
  const auto [dst, scale] = convert_value_table("UltraMem::set_value_format: ", values, format_, f);
  set_value_table(dst, scale, /*read_only=*/false);
}

void UltraMemImpl::set_value_table(torch::Tensor v, torch::Tensor scale, bool read_only) {
  const std::string who = "UltraMem::set_value_table: ";
  const ValueFormat f =
      check_value_table(who, "[N, Dv]", v, scale, cfg_.physical_rows(), cfg_.Dv, wq.scalar_type());
  if (value_lookup_ && f != ValueFormat::kFloat32)
    throw std::logic_error(who + "a value lookup is installed (sharded table); only float32 tables can be sharded");
  install_value_table(*this, values, values_scale, format_, who, v, scale, f, read_only);
  values_read_only_ = read_only;
}

void UltraMemImpl::set_permutation_table(torch::Tensor p) {
  const int64_t slots = cfg_.n * cfg_.n;
  if (!p.defined() || p.dim() != 1 || p.size(0) != slots || p.scalar_type() != torch::kLong || !p.is_contiguous() ||
      !p.device().is_cpu())
    throw std::invalid_argument("UltraMem::set_permutation_table: perm must be a contiguous int64 CPU tensor [n*n] = [" +
                                std::to_string(slots) + "], got " + (p.defined() ? shape_string(p) : "undefined"));
  torch::NoGradGuard no_grad;
  perm.set_data(p);
}

// ---- the fast path: the fused op (ops/ultramem_decode.h) ----------------------------------------

struct UltraMemImpl::DecodeArgs {
  ops::UltraMemDecodeWeights w;
  ops::UltraMemDims d;
};

UltraMemImpl::DecodeArgs UltraMemImpl::decode_args(torch::ScalarType st) {
  const auto& c = cfg_;
  if (st != torch::kFloat && st != torch::kDouble)
    throw std::invalid_argument(std::string("UltraMem: input dtype must be float32 or float64, got ") +
                                c10::toString(st));
  if (format_ == ValueFormat::kFloat32 && values.scalar_type() != st)
    throw std::invalid_argument(std::string("UltraMem: the value table is ") + c10::toString(values.scalar_type()) +
                                ", the layer computes in " + c10::toString(st));
  DecodeArgs a;
  auto& w = a.w;
  {
    // Normalised and folded keys, cached; the permutation's range checked once.
    auto& ic = *infer_;
    std::lock_guard<std::mutex> lock(ic.mu);
    if (!ic.valid || ic.compute != st || ic.keys_ptr != keys.data_ptr() ||
        ic.k_scale_ptr != k_scale.data_ptr() || ic.keys_version != version_of(keys) ||
        ic.k_scale_version != version_of(k_scale) || ic.u_ptr != u_vec.data_ptr() ||
        ic.v_ptr != v_vec.data_ptr() || ic.u_version != version_of(u_vec) || ic.v_version != version_of(v_vec) ||
        (c.filter_vectors() > 0 && (ic.cores_ptr != cores.data_ptr() || ic.cores_version != version_of(cores)))) {
      const auto kt = keys.detach().transpose(3, 4);  // [H, 2, n, r, Dk]
      const auto ks = k_scale.detach();
      const auto [fu, fv] = filter_vectors();
      ic.keys = ops::compact_keys(
          ops::fold_filter_keys(norm(kt.select(1, 0), ks[0]), norm(kt.select(1, 1), ks[1]), fu, fv, c.query_per_rank),
          to_string(key_format_));
      ic.cores_ptr = cores.data_ptr();
      ic.cores_version = version_of(cores);
      ic.compute = st;
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
    if (cfg_.external_values) {
      if (!tiered_ || !tiered_->feistel_key())
        throw std::logic_error("UltraMem: the layer's value table is external (not in memory): install its table "
                               "file with set_tiered_values and a Feistel key before a forward");
    } else if (tiered_ && tiered_->feistel_key()) {
      // The reads go through the key: the stored permutation (maybe a mapping of gigabytes) is not read.
    } else if (ic.perm_ptr != perm.data_ptr() || ic.perm_version != version_of(perm)) {
      const std::string bad = ops::permutation_error(perm, c.n * c.n);
      if (!bad.empty()) throw std::runtime_error("UltraMem: " + bad + " (n*n slots); corrupt weights?");
      ic.perm_ptr = perm.data_ptr();
      ic.perm_version = version_of(perm);
    }
    w.keys = ic.keys;
  }
  w.wq = wq.detach();
  w.q_scale = q_scale.detach();
  w.cores = cores.detach();
  if (tiered_) {
    w.tiered = tiered_;
  } else {
    w.values = values.detach();
    if (format_ == ValueFormat::kInt8) w.values_scale = values_scale;
  }
  w.perm = perm;
  w.wo = wo.detach();
  if (c.Dp > 0) {
    w.wp = wp.detach();
    w.pre_values = pre_values.detach();
  }
  auto& d = a.d;
  d.D = c.D;
  d.Dk = c.Dk;
  d.Dv = c.Dv;
  d.H = c.H;
  d.r = c.r;
  d.n = c.n;
  d.C = c.C;
  d.E = c.E;
  d.m = c.m;
  d.m_first = c.first_stage_m();
  d.m_neg = c.filter_negatives();
  d.filter_rank = c.filter_vectors();
  d.rms_norm = c.qk_norm == NormKind::RMS;
  d.query_per_rank = c.query_per_rank;
  d.single_projection = c.single_projection;
  d.Dp = c.Dp;
  return a;
}

torch::Tensor UltraMemImpl::forward_inference(const torch::Tensor& u) {
  const auto a = decode_args(u.scalar_type());
  if (!cfg_.track_stats) return ops::ultramem_decode(u, a.w, a.d);
  torch::Tensor scores, index;
  auto out = ops::ultramem_decode(u, a.w, a.d, &scores, &index);
  record_stats(u, scores, index, out);
  return out;
}

bool UltraMemImpl::two_phase_applies() const {
  return !at::GradMode::is_enabled() && !value_lookup_;
}

UltraMemImpl::PendingLookup UltraMemImpl::retrieve(const torch::Tensor& x, int64_t prefetch_bytes) {
  if (!two_phase_applies())
    throw std::logic_error("UltraMem::retrieve: the two-phase forward needs grad mode off and the local value table "
                           "(no set_value_lookup); use forward()");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == cfg_.D, "UltraMem: input must have shape [..., D=", cfg_.D, "], got ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == wq.scalar_type(), "UltraMem: input dtype ", x.scalar_type(), " differs from the layer's ",
              wq.scalar_type());
  PendingLookup p;
  p.lead = x.sizes().vec();
  const auto u = x.reshape({-1, cfg_.D}).contiguous();
  const auto a = decode_args(u.scalar_type());
  auto r = ops::ultramem_retrieve(u, a.w, a.d);
  if (prefetch_bytes > 0) ops::ultramem_prefetch_values(r, a.w, a.d, prefetch_bytes);
  p.scores = std::move(r.scores);
  p.index = std::move(r.index);
  p.pre = std::move(r.pre);
  if (cfg_.track_stats) p.u = u;
  return p;
}

torch::Tensor UltraMemImpl::lookup(const PendingLookup& p) {
  if (!two_phase_applies())
    throw std::logic_error("UltraMem::lookup: the two-phase forward needs grad mode off and the local value table");
  TORCH_CHECK(p.index.defined() && p.scores.defined(), "UltraMem::lookup: no retrieval pending (call retrieve first)");
  const auto a = decode_args(p.scores.scalar_type());
  auto out = ops::ultramem_lookup({p.scores, p.index, p.pre}, a.w, a.d);
  if (cfg_.track_stats && p.u.defined()) record_stats(p.u, p.scores, p.index, out);
  return out.view(p.lead);
}

}  // namespace ultramem::nn
