#include "ultramem/ops/engram_decode.h"

#include <torch/torch.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "ultramem/ops/check.h"
#include "ultramem/ops/project.h"

namespace ultramem::ops {
namespace {

constexpr double kEps = 1e-6;  // nn::Engram's

// Per-thread scratch, reused across calls.
template <typename S>
struct EngramScratch {
  std::vector<S> e, k, v, x, y, before, un, kn;
};
template <typename S>
EngramScratch<S>& engram_scratch() {
  thread_local EngramScratch<S> s;
  return s;
}

// e[t, j*w .. (j+1)*w) = row rows[t, j] of the table, widened to S.
template <typename S>
void gather_rows(const EngramDecodeWeights& w, const int64_t* rows, int64_t n, int64_t J, int64_t width, S* e) {
  const auto st = w.values.scalar_type();
  for (int64_t i = 0; i < n * J; ++i) {
    S* dst = e + i * width;
    const int64_t r = rows[i];
    if (st == at::kBFloat16) {
      const uint16_t* src = reinterpret_cast<const uint16_t*>(w.values.data_ptr()) + r * width;
      for (int64_t c = 0; c < width; ++c) {
        const uint32_t bits = uint32_t(src[c]) << 16;
        float f;
        std::memcpy(&f, &bits, sizeof f);
        dst[c] = S(f);
      }
    } else if (st == at::kChar) {
      const int8_t* src = w.values.data_ptr<int8_t>() + r * width;
      const float s = w.values_scale.data_ptr<float>()[r];
      for (int64_t c = 0; c < width; ++c) dst[c] = S(float(src[c]) * s);
    } else {
      const S* src = w.values.data_ptr<S>() + r * width;
      std::copy(src, src + width, dst);
    }
  }
}

template <typename S>
void engram_impl(const S* u, const int64_t* rows, int64_t B, int64_t T, int64_t J, const EngramDecodeWeights& w,
                 S* state,  // [B, P, D] in/out
                 S* out) {  // [B, T, D]
  const int64_t D = w.wk.size(1), d_e = w.wk.size(0), width = d_e / J, K = w.conv.size(1), P = K - 1, n = B * T;
  auto& sc = engram_scratch<S>();
  S* e = detail::sized(sc.e, n * d_e);
  S* k = detail::sized(sc.k, n * D);
  S* v = detail::sized(sc.v, n * D);
  S* x = detail::sized(sc.x, n * D);
  S* y = detail::sized(sc.y, n * D);
  S* un = detail::sized(sc.un, D);
  S* kn = detail::sized(sc.kn, D);
  gather_rows<S>(w, rows, n, J, width, e);
  detail::project<S>(e, n, d_e, w.wk, k);  // [n, D]
  detail::project<S>(e, n, d_e, w.wv, v);  // [n, D]
  const S* gu = w.gate_u.data_ptr<S>();
  const S* gk = w.gate_k.data_ptr<S>();
  const S* cn = w.conv_norm.data_ptr<S>();
  const double inv_sqrt_d = 1.0 / std::sqrt(double(D));
  for (int64_t t = 0; t < n; ++t) {
    detail::rms_normalise_row<S>(u + t * D, D, gu, kEps, un);
    detail::rms_normalise_row<S>(k + t * D, D, gk, kEps, kn);
    S dot = 0;
    for (int64_t d = 0; d < D; ++d) dot += un[d] * kn[d];
    const S alpha = S(1) / (S(1) + std::exp(-S(double(dot) * inv_sqrt_d)));
    for (int64_t d = 0; d < D; ++d) x[t * D + d] = alpha * v[t * D + d];
    detail::rms_normalise_row<S>(x + t * D, D, cn, kEps, y + t * D);
  }
  // The causal depthwise convolution per sequence: input i steps back is y[t - i], or the state's row
  // P + t - i before the first position.
  const S* taps = w.conv.data_ptr<S>();  // [D, K]
  S* before = detail::sized(sc.before, P * D);
  for (int64_t b = 0; b < B; ++b) {
    S* st = state + b * P * D;
    std::copy(st, st + P * D, before);
    const S* yb = y + b * T * D;
    for (int64_t t = 0; t < T; ++t) {
      S* o = out + (b * T + t) * D;
      const S* xt = x + (b * T + t) * D;
      for (int64_t d = 0; d < D; ++d) {
        S acc = 0;
        for (int64_t i = 0; i < K; ++i) {
          const int64_t s = t - i;
          acc += (s >= 0 ? yb[s * D + d] : before[(P + s) * D + d]) * taps[d * K + i];
        }
        o[d] = acc / (S(1) + std::exp(-acc)) + xt[d];
      }
    }
    for (int64_t p = 0; p < P; ++p) {  // the last P inputs of before ++ y
      const int64_t s = T + p - P;
      const S* src = s >= 0 ? yb + s * D : before + (T + p) * D;
      std::copy(src, src + D, st + p * D);
    }
  }
}

void check_arg(const at::Tensor& t, const char* what, std::initializer_list<int64_t> sizes, at::ScalarType st) {
  detail::check_tensor(t, what, int64_t(sizes.size()), {st});
  std::string expected = "[";
  for (int64_t s : sizes) expected += (expected.size() > 1 ? ", " : "") + std::to_string(s);
  detail::check_sizes(t, what, sizes, (expected + "]").c_str());
  TORCH_CHECK(t.is_contiguous(), what, " must be contiguous");
}

}  // namespace

at::Tensor engram_decode(const at::Tensor& u, const at::Tensor& rows, const EngramDecodeWeights& w,
                         at::Tensor& conv_state) {
  detail::check_tensor(u, "engram_decode: u", 3, {at::kFloat, at::kDouble});
  TORCH_CHECK(u.is_contiguous(), "engram_decode: u must be contiguous");
  const auto st = u.scalar_type();
  const int64_t B = u.size(0), T = u.size(1), D = u.size(2);
  detail::check_tensor(w.wk, "engram_decode: wk", 2, {st});
  const int64_t d_e = w.wk.size(0);
  check_arg(w.wk, "engram_decode: wk", {d_e, D}, st);
  check_arg(w.wv, "engram_decode: wv", {d_e, D}, st);
  check_arg(w.gate_u, "engram_decode: gate_u", {D}, st);
  check_arg(w.gate_k, "engram_decode: gate_k", {D}, st);
  check_arg(w.conv_norm, "engram_decode: conv_norm", {D}, st);
  detail::check_tensor(w.conv, "engram_decode: conv", 2, {st});
  const int64_t K = w.conv.size(1);
  TORCH_CHECK(K >= 1, "engram_decode: conv must have at least one tap");
  check_arg(w.conv, "engram_decode: conv", {D, K}, st);
  detail::check_tensor(rows, "engram_decode: rows", 3, {at::kLong});
  TORCH_CHECK(rows.size(0) == B && rows.size(1) == T && rows.size(2) >= 1 && d_e % rows.size(2) == 0,
              "engram_decode: rows must be [B, T, J] = [", B, ", ", T, ", J] with J dividing d_e = ", d_e, ", got ",
              detail::shape_str(rows));
  TORCH_CHECK(rows.is_contiguous(), "engram_decode: rows must be contiguous");
  const int64_t J = rows.size(2), width = d_e / J;
  detail::check_tensor(w.values, "engram_decode: values", 2, {st, at::kBFloat16, at::kChar});
  const int64_t R = w.values.size(0);
  check_arg(w.values, "engram_decode: values", {R, width}, w.values.scalar_type());
  if (w.values.scalar_type() == at::kChar) check_arg(w.values_scale, "engram_decode: values_scale", {R}, at::kFloat);
  check_arg(conv_state, "engram_decode: conv_state", {B, K - 1, D}, st);
  const int64_t* r = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows.numel(); ++i)
    TORCH_CHECK(r[i] >= 0 && r[i] < R, "engram_decode: rows entry ", r[i], " is outside the table's [0, ", R, ")");
  at::Tensor out = at::empty({B, T, D}, u.options());
  if (B * T == 0) return out;
  if (st == at::kFloat)
    engram_impl<float>(u.data_ptr<float>(), r, B, T, J, w, conv_state.data_ptr<float>(), out.data_ptr<float>());
  else
    engram_impl<double>(u.data_ptr<double>(), r, B, T, J, w, conv_state.data_ptr<double>(), out.data_ptr<double>());
  return out;
}

at::Tensor engram_decode_op(const at::Tensor& u, const at::Tensor& rows, const at::Tensor& values,
                            const c10::optional<at::Tensor>& values_scale, const at::Tensor& wk, const at::Tensor& wv,
                            const at::Tensor& gate_u, const at::Tensor& gate_k, const at::Tensor& conv_norm,
                            const at::Tensor& conv, at::Tensor& conv_state) {
  EngramDecodeWeights w{values, values_scale ? *values_scale : at::Tensor(), wk, wv, gate_u, gate_k, conv_norm, conv};
  return engram_decode(u, rows, w, conv_state);
}

}  // namespace ultramem::ops
