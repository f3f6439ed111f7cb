#include "ultramem/ops/moe_decode.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "ultramem/ops/check.h"
#include "ultramem/ops/project.h"

namespace ultramem::ops {
namespace {

using detail::dtype_of;
using detail::project;

// Expert e of a [K, ...] matrix stack (float, or compact rows with their [K, N] scales).
Matrix expert(const Matrix& m, int64_t e) {
  return m.scale.defined() ? Matrix(m.w[e], m.scale[e]) : Matrix(m.w[e]);
}

template <typename S>
void moe_impl(const S* x, int64_t T, int64_t D, const at::Tensor& router, const Matrix& w_in,
              const Matrix& w_out, int64_t top_k, S* out, MoeDecodeStats* stats) {
  const int64_t K = router.size(1);
  std::vector<S> logits(T * K);                                 // [T, K]
  project<S>(x, T, D, router, logits.data());
  // Routing: softmax, top-k (ties: smaller expert), renormalised weights; tokens grouped by expert.
  std::vector<std::vector<int64_t>> tokens(K);                  // per expert: its tokens, ascending
  std::vector<std::vector<S>> weights(K);                       // per expert: their weights
  std::vector<double> prob_sum(K, 0.0);
  std::vector<S> p(K);
  std::vector<int64_t> order(K);
  for (int64_t t = 0; t < T; ++t) {
    const S* l = logits.data() + t * K;
    const S mx = *std::max_element(l, l + K);
    S sum = 0;
    for (int64_t e = 0; e < K; ++e) sum += (p[e] = std::exp(l[e] - mx));
    for (int64_t e = 0; e < K; ++e) {
      p[e] /= sum;
      prob_sum[e] += double(p[e]);
    }
    std::iota(order.begin(), order.end(), int64_t(0));
    std::partial_sort(order.begin(), order.begin() + top_k, order.end(),
                      [&](int64_t a, int64_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
    S kept = 0;
    for (int64_t j = 0; j < top_k; ++j) kept += p[order[j]];
    for (int64_t j = 0; j < top_k; ++j) {
      const int64_t e = order[j];
      tokens[e].push_back(t);
      weights[e].push_back(top_k > 1 ? p[e] / kept : p[e]);
    }
  }
  std::fill(out, out + T * D, S(0));
  std::vector<S> xe, hid, act, ye;
  for (int64_t e = 0; e < K; ++e) {
    const int64_t cnt = int64_t(tokens[e].size());
    if (cnt == 0) continue;
    xe.resize(cnt * D);
    for (int64_t r = 0; r < cnt; ++r) std::copy(x + tokens[e][r] * D, x + (tokens[e][r] + 1) * D, xe.data() + r * D);
    ye.resize(cnt * D);
    detail::swiglu_rows<S>(xe.data(), cnt, D, expert(w_in, e), expert(w_out, e), hid, act, ye.data());  // [cnt, D]
    for (int64_t r = 0; r < cnt; ++r) {
      S* o = out + tokens[e][r] * D;
      const S w = weights[e][r];
      for (int64_t d = 0; d < D; ++d) o[d] += w * ye[r * D + d];
    }
  }
  if (stats) {
    stats->counts = torch::empty({K}, torch::kLong);
    stats->mean_probs = torch::empty({K}, torch::TensorOptions().dtype(dtype_of<S>()));
    for (int64_t e = 0; e < K; ++e) {
      stats->counts[e] = int64_t(tokens[e].size());
      stats->mean_probs[e] = T > 0 ? prob_sum[e] / double(T) : 0.0;
    }
  }
}

}  // namespace

at::Tensor moe_decode(const at::Tensor& x, const at::Tensor& router, const at::Tensor& w_in, const at::Tensor& w_out,
                      int64_t top_k, MoeDecodeStats* stats) {
  return moe_decode(x, router, Matrix(w_in), Matrix(w_out), top_k, stats);
}

at::Tensor moe_decode(const at::Tensor& x, const at::Tensor& router, const Matrix& w_in, const Matrix& w_out,
                      int64_t top_k, MoeDecodeStats* stats) {
  using detail::check_tensor;
  const auto fp = {at::kFloat, at::kDouble};
  check_tensor(x, "moe_decode: x", 2, fp);
  const auto st = x.scalar_type();
  const int64_t T = x.size(0), D = x.size(1);
  check_tensor(router, "moe_decode: router", 2, {st});
  TORCH_CHECK(router.size(0) == D && router.size(1) >= 1, "moe_decode: router must be [D=", D, ", K], got ",
              router.sizes());
  const int64_t K = router.size(1);
  // Float [K, D, 2*h] / [K, h, D], or compact rows [K, 2*h, D] / [K, D, h] with [K, N] int8 scales.
  auto check_stack = [&](const Matrix& m, const char* what, int64_t k_in, int64_t n_out, const char* shape) {
    const bool compact = m.compact();
    check_tensor(m.w, what, 3, compact ? std::initializer_list<at::ScalarType>{at::kBFloat16, at::kChar}
                                       : std::initializer_list<at::ScalarType>{st});
    const int64_t n = compact ? m.w.size(1) : m.w.size(2), k = compact ? m.w.size(2) : m.w.size(1);
    TORCH_CHECK(m.w.size(0) == K && k == k_in && (n_out < 0 ? n % 2 == 0 && n > 0 : n == n_out), what,
                " must be ", compact ? "compact rows " : "", shape, ", got ", m.w.sizes());
    TORCH_CHECK(!compact || st == at::kFloat, what, ": compact experts need a float32 input");
    if (m.w.scalar_type() == at::kChar) {
      check_tensor(m.scale, what, 2, {at::kFloat});
      TORCH_CHECK(m.scale.size(0) == K && m.scale.size(1) == n, what, " scale must be [K, N], got ", m.scale.sizes());
    } else {
      TORCH_CHECK(!m.scale.defined(), what, compact ? ": bf16 rows take no scale" : ": a float matrix takes no scale");
    }
    return n;
  };
  const int64_t h = check_stack(w_in, "moe_decode: w_in", D, -1, "[K, D, 2*h] (compact [K, 2*h, D])") / 2;
  check_stack(w_out, "moe_decode: w_out", h, D, "[K, h, D] (compact [K, D, h])");
  TORCH_CHECK(top_k >= 1 && top_k <= K, "moe_decode: top_k must be in [1, K=", K, "], got ", top_k);
  const at::Tensor xc = x.contiguous(), rc = router.contiguous();
  const Matrix ic(w_in.w.contiguous(), w_in.scale.defined() ? w_in.scale.contiguous() : at::Tensor());
  const Matrix oc(w_out.w.contiguous(), w_out.scale.defined() ? w_out.scale.contiguous() : at::Tensor());
  at::Tensor out = torch::empty({T, D}, x.options());
  if (st == at::kFloat)
    moe_impl<float>(xc.data_ptr<float>(), T, D, rc, ic, oc, top_k, out.data_ptr<float>(), stats);
  else
    moe_impl<double>(xc.data_ptr<double>(), T, D, rc, ic, oc, top_k, out.data_ptr<double>(), stats);
  return out;
}

}  // namespace ultramem::ops
