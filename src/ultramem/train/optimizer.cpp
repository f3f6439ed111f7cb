#include "ultramem/train/optimizer.h"

#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <torch/types.h>

#include <cmath>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#include <set>
#include <stdexcept>

namespace ultramem::train {
namespace {

// Per-step constants of one group, in the parameter's precision (as torch's AdamW casts its scalars).
template <typename T>
struct Hyper {
  T b1, b2, one_minus_b1, one_minus_b2, eps;
  T decay_factor;  // 1 - lr * wd
  bool decay;      // wd != 0
  T step_size;     // lr / (1 - b1^t)
  T sqrt_bc2;      // sqrt(1 - b2^t)
};

// The AdamW update of elements [i, n), one at a time. The operation order follows ATen's mul_/add_/
// addcmul_/addcdiv_ sequence of torch's AdamW, so both agree to rounding.
template <typename T>
inline void adamw_scalar(T* p, T* m, T* v, const T* g, int64_t i, int64_t n, const Hyper<T>& h) {
  for (; i < n; ++i) {
    const T gi = g[i];
    T pi = p[i];
    if (h.decay) pi = pi * h.decay_factor;
    const T mi = m[i] * h.b1 + h.one_minus_b1 * gi;
    const T vi = v[i] * h.b2 + h.one_minus_b2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    const T denom = std::sqrt(vi) / h.sqrt_bc2 + h.eps;
    p[i] = pi + (-h.step_size) * (mi / denom);
  }
}

// The same update on n consecutive elements, 4 floats / 2 doubles at a time with SSE2 (the x86-64
// baseline; the compiler does not vectorise std::sqrt because of errno). Every operation is an IEEE
// correctly rounded mul/add/div/sqrt in the same order as adamw_scalar, without fused multiply-add,
// so vector and scalar lanes give bit-identical results.
inline void adamw_span(float* p, float* m, float* v, const float* g, int64_t n, const Hyper<float>& h) {
  int64_t i = 0;
#if defined(__SSE2__)
  const __m128 b1 = _mm_set1_ps(h.b1), b2 = _mm_set1_ps(h.b2);
  const __m128 c1 = _mm_set1_ps(h.one_minus_b1), c2 = _mm_set1_ps(h.one_minus_b2);
  const __m128 decay = _mm_set1_ps(h.decay_factor), sbc2 = _mm_set1_ps(h.sqrt_bc2);
  const __m128 eps = _mm_set1_ps(h.eps), nstep = _mm_set1_ps(-h.step_size);
  for (; i + 4 <= n; i += 4) {
    const __m128 gi = _mm_loadu_ps(g + i);
    __m128 pi = _mm_loadu_ps(p + i);
    if (h.decay) pi = _mm_mul_ps(pi, decay);
    const __m128 mi = _mm_add_ps(_mm_mul_ps(_mm_loadu_ps(m + i), b1), _mm_mul_ps(c1, gi));
    const __m128 vi = _mm_add_ps(_mm_mul_ps(_mm_loadu_ps(v + i), b2), _mm_mul_ps(_mm_mul_ps(c2, gi), gi));
    _mm_storeu_ps(m + i, mi);
    _mm_storeu_ps(v + i, vi);
    const __m128 denom = _mm_add_ps(_mm_div_ps(_mm_sqrt_ps(vi), sbc2), eps);
    _mm_storeu_ps(p + i, _mm_add_ps(pi, _mm_mul_ps(nstep, _mm_div_ps(mi, denom))));
  }
#endif
  adamw_scalar(p, m, v, g, i, n, h);
}

inline void adamw_span(double* p, double* m, double* v, const double* g, int64_t n, const Hyper<double>& h) {
  int64_t i = 0;
#if defined(__SSE2__)
  const __m128d b1 = _mm_set1_pd(h.b1), b2 = _mm_set1_pd(h.b2);
  const __m128d c1 = _mm_set1_pd(h.one_minus_b1), c2 = _mm_set1_pd(h.one_minus_b2);
  const __m128d decay = _mm_set1_pd(h.decay_factor), sbc2 = _mm_set1_pd(h.sqrt_bc2);
  const __m128d eps = _mm_set1_pd(h.eps), nstep = _mm_set1_pd(-h.step_size);
  for (; i + 2 <= n; i += 2) {
    const __m128d gi = _mm_loadu_pd(g + i);
    __m128d pi = _mm_loadu_pd(p + i);
    if (h.decay) pi = _mm_mul_pd(pi, decay);
    const __m128d mi = _mm_add_pd(_mm_mul_pd(_mm_loadu_pd(m + i), b1), _mm_mul_pd(c1, gi));
    const __m128d vi = _mm_add_pd(_mm_mul_pd(_mm_loadu_pd(v + i), b2), _mm_mul_pd(_mm_mul_pd(c2, gi), gi));
    _mm_storeu_pd(m + i, mi);
    _mm_storeu_pd(v + i, vi);
    const __m128d denom = _mm_add_pd(_mm_div_pd(_mm_sqrt_pd(vi), sbc2), eps);
    _mm_storeu_pd(p + i, _mm_add_pd(pi, _mm_mul_pd(nstep, _mm_div_pd(mi, denom))));
  }
#endif
  adamw_scalar(p, m, v, g, i, n, h);
}

template <typename T>
Hyper<T> make_hyper(const AdamWOptions& o, double lr, double wd, int64_t t) {
  Hyper<T> h;
  h.b1 = static_cast<T>(o.beta1);
  h.b2 = static_cast<T>(o.beta2);
  h.one_minus_b1 = static_cast<T>(1.0 - o.beta1);
  h.one_minus_b2 = static_cast<T>(1.0 - o.beta2);
  h.eps = static_cast<T>(o.eps);
  h.decay = wd != 0.0;
  h.decay_factor = static_cast<T>(1.0 - lr * wd);
  h.step_size = static_cast<T>(lr / (1.0 - std::pow(o.beta1, static_cast<double>(t))));
  h.sqrt_bc2 = static_cast<T>(std::sqrt(1.0 - std::pow(o.beta2, static_cast<double>(t))));
  return h;
}

template <typename T>
void dense_update(at::Tensor& p, at::Tensor& m, at::Tensor& v, const at::Tensor& g, const Hyper<T>& h) {
  T* pp = p.data_ptr<T>();
  T* mp = m.data_ptr<T>();
  T* vp = v.data_ptr<T>();
  const T* gp = g.data_ptr<T>();
  at::parallel_for(0, p.numel(), 1 << 15, [&](int64_t b, int64_t e) {
    adamw_span(pp + b, mp + b, vp + b, gp + b, e - b, h);
  });
}

// rows: [U] int64 distinct row ids; vals: [U, cols] gradient of those rows.
template <typename T>
void row_update(at::Tensor& p, at::Tensor& m, at::Tensor& v, const at::Tensor& rows,
                const at::Tensor& vals, int64_t cols, const Hyper<T>& h) {
  T* pp = p.data_ptr<T>();
  T* mp = m.data_ptr<T>();
  T* vp = v.data_ptr<T>();
  const T* gp = vals.data_ptr<T>();
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, cols));
  // Rows of a huge table are far apart: prefetch the weights and moments of the row kAhead positions
  // ahead, so that the memory latency of the scattered rows overlaps the arithmetic.
  constexpr int64_t kAhead = 4;
  const int64_t row_bytes = cols * static_cast<int64_t>(sizeof(T));
  at::parallel_for(0, rows.numel(), grain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      if (i + kAhead < e) {
        const int64_t ahead = rp[i + kAhead] * cols;
        for (int64_t byte = 0; byte < row_bytes; byte += 64) {
          __builtin_prefetch(reinterpret_cast<const char*>(pp + ahead) + byte, 1);
          __builtin_prefetch(reinterpret_cast<const char*>(mp + ahead) + byte, 1);
          __builtin_prefetch(reinterpret_cast<const char*>(vp + ahead) + byte, 1);
        }
      }
      const int64_t off = rp[i] * cols;
      adamw_span(pp + off, mp + off, vp + off, gp + i * cols, cols, h);
    }
  });
}

std::string shape_str(at::IntArrayRef s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

}  // namespace

AdamW::AdamW(std::vector<ParamGroup> groups, AdamWOptions options)
    : groups_(std::move(groups)), opt_(options) {
  if (!(opt_.beta1 >= 0 && opt_.beta1 < 1))
    throw std::invalid_argument("AdamW: beta1 must be in [0, 1), got " + std::to_string(opt_.beta1));
  if (!(opt_.beta2 >= 0 && opt_.beta2 < 1))
    throw std::invalid_argument("AdamW: beta2 must be in [0, 1), got " + std::to_string(opt_.beta2));
  if (!(opt_.eps > 0)) throw std::invalid_argument("AdamW: eps must be > 0");
  std::set<const void*> seen;
  std::set<std::string> names;
  for (auto& g : groups_) {
    if (g.param_names.empty()) {
      for (size_t i = 0; i < g.params.size(); ++i) g.param_names.push_back(g.name + "." + std::to_string(i));
    }
    if (g.param_names.size() != g.params.size())
      throw std::invalid_argument("AdamW: group '" + g.name + "' has " + std::to_string(g.params.size()) +
                                  " parameters but " + std::to_string(g.param_names.size()) + " names");
    if (!(std::isfinite(g.weight_decay) && g.weight_decay >= 0))
      throw std::invalid_argument("AdamW: group '" + g.name + "': weight_decay must be finite and >= 0");
    std::vector<State> st;
    for (size_t i = 0; i < g.params.size(); ++i) {
      const auto& p = g.params[i];
      const std::string& nm = g.param_names[i];
      const std::string where = "AdamW: parameter '" + nm + "' (group '" + g.name + "')";
      if (!p.defined()) throw std::invalid_argument(where + " is undefined");
      if (p.is_sparse()) throw std::invalid_argument(where + " is sparse; parameters must be dense");
      if (p.scalar_type() != at::kFloat && p.scalar_type() != at::kDouble)
        throw std::invalid_argument(where + " must be float32 or float64");
      if (!p.is_contiguous()) throw std::invalid_argument(where + " must be contiguous");
      if (g.row_sparse && p.dim() < 1)
        throw std::invalid_argument(where + ": a row-sparse parameter needs at least one dimension");
      if (!seen.insert(p.unsafeGetTensorImpl()).second)
        throw std::invalid_argument(where + " appears more than once");
      if (!names.insert(nm).second) throw std::invalid_argument("AdamW: parameter name '" + nm + "' repeats");
      st.push_back({at::zeros_like(p, at::MemoryFormat::Contiguous),
                    at::zeros_like(p, at::MemoryFormat::Contiguous)});
    }
    state_.push_back(std::move(st));
  }
}

ParamGroup& AdamW::group(const std::string& name) {
  for (auto& g : groups_)
    if (g.name == name) return g;
  throw std::invalid_argument("AdamW: no parameter group named '" + name + "'");
}

void AdamW::zero_grad() {
  for (auto& g : groups_)
    for (auto& p : g.params)
      if (p.grad().defined()) p.mutable_grad().reset();
}

void AdamW::step(double lr) {
  if (!std::isfinite(lr) || lr < 0) throw std::invalid_argument("AdamW::step: lr must be finite and >= 0");
  // Validate every gradient first, so that a bad one leaves the optimizer and the weights untouched.
  for (const auto& grp : groups_)
    for (size_t i = 0; i < grp.params.size(); ++i) {
      const at::Tensor& grad = grp.params[i].grad();
      if (grad.defined() && grad.sizes() != grp.params[i].sizes())
        throw std::invalid_argument("AdamW::step: gradient of '" + grp.param_names[i] + "' has shape " +
                                    shape_str(grad.sizes()) + ", the parameter " +
                                    shape_str(grp.params[i].sizes()));
    }
  at::NoGradGuard no_grad;
  ++step_;
  for (size_t gi = 0; gi < groups_.size(); ++gi) {
    auto& grp = groups_[gi];
    const double glr = lr * grp.lr_mult;
    for (size_t i = 0; i < grp.params.size(); ++i) {
      auto& p = grp.params[i];
      at::Tensor grad = p.grad();
      if (!grad.defined() || p.numel() == 0) continue;
      auto& s = state_[gi][i];
      if (grad.scalar_type() != p.scalar_type()) grad = grad.to(p.scalar_type());
      if (!grp.row_sparse || p.dim() == 0) {
        grad = grad.is_sparse() ? grad.to_dense() : grad.contiguous();
        AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "AdamW dense", [&] {
          dense_update<scalar_t>(p, s.exp_avg, s.exp_avg_sq, grad,
                                 make_hyper<scalar_t>(opt_, glr, grp.weight_decay, step_));
        });
        continue;
      }
      const int64_t R = p.size(0);
      const int64_t cols = R == 0 ? 0 : p.numel() / R;
      at::Tensor rows, vals;
      if (grad.is_sparse() && grad.sparse_dim() == 1) {
        const at::Tensor c = grad.coalesce();
        rows = c._indices().select(0, 0).contiguous();
        vals = c._values().reshape({rows.numel(), cols}).contiguous();
      } else {
        const at::Tensor d = (grad.is_sparse() ? grad.to_dense() : grad).contiguous().reshape({R, cols});
        rows = d.ne(0).any(1).nonzero().select(1, 0).contiguous();
        vals = d.index_select(0, rows).contiguous();
      }
      if (rows.numel() == 0) continue;
      AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "AdamW row-sparse", [&] {
        row_update<scalar_t>(p, s.exp_avg, s.exp_avg_sq, rows, vals, cols,
                             make_hyper<scalar_t>(opt_, glr, grp.weight_decay, step_));
      });
    }
  }
}

std::vector<std::pair<std::string, torch::Tensor>> AdamW::state_tensors() const {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (size_t gi = 0; gi < groups_.size(); ++gi) {
    for (size_t i = 0; i < groups_[gi].params.size(); ++i) {
      out.emplace_back(groups_[gi].param_names[i] + ".exp_avg", state_[gi][i].exp_avg);
      out.emplace_back(groups_[gi].param_names[i] + ".exp_avg_sq", state_[gi][i].exp_avg_sq);
    }
  }
  out.emplace_back("step", at::scalar_tensor(step_, at::kLong));
  return out;
}

void AdamW::load_state_tensors(const std::map<std::string, torch::Tensor>& state) {
  const auto mine = state_tensors();
  std::set<std::string> expected;
  for (const auto& [name, t] : mine) {
    expected.insert(name);
    auto it = state.find(name);
    if (it == state.end()) throw std::runtime_error("optimizer state: missing tensor '" + name + "'");
    const auto& src = it->second;
    if (src.sizes() != t.sizes() || src.scalar_type() != t.scalar_type())
      throw std::runtime_error("optimizer state: tensor '" + name + "' has shape " + shape_str(src.sizes()) +
                               " " + std::string(c10::toString(src.scalar_type())) + ", expected " +
                               shape_str(t.sizes()) + " " + std::string(c10::toString(t.scalar_type())));
  }
  for (const auto& [name, t] : state)
    if (!expected.count(name)) throw std::runtime_error("optimizer state: unexpected tensor '" + name + "'");
  const int64_t step = state.at("step").item<int64_t>();
  if (step < 0) throw std::runtime_error("optimizer state: negative step count");
  at::NoGradGuard no_grad;
  for (const auto& [name, t] : mine) {
    if (name == "step") continue;
    at::Tensor dst = t;
    dst.copy_(state.at(name));
  }
  step_ = step;
}

}  // namespace ultramem::train
