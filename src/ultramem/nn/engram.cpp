#include "ultramem/nn/engram.h"

#include <torch/torch.h>

#include <cmath>
#include <stdexcept>
#include <string>

#include "ultramem/nn/rmsnorm.h"
#include "ultramem/nn/value_table.h"
#include "ultramem/ops/block_decode.h"
#include "ultramem/ops/engram_decode.h"

namespace ultramem::nn {

namespace {

constexpr int64_t kPad = -1;  // the id of positions before the sequence's start (ops/engram_rows.h)
constexpr double kEps = 1e-6;

}  // namespace

EngramImpl::EngramImpl(EngramConfig cfg) : cfg_(std::move(cfg)) {
  cfg_.validate();
  const auto& c = cfg_;
  hash_ = ops::engram_hash(c.heads, c.rows, c.seed);  // distinct primes: each table starts above the previous one
  const int64_t total = hash_.total_rows();
  torch::Generator gen = at::detail::createCPUGenerator(c.seed);
  values = register_parameter("values", at::normal(0.0, c.value_std, {total, c.row_width()}, gen));
  const double std = 1.0 / std::sqrt(double(c.d_e));
  wk = register_parameter("wk", at::normal(0.0, std, {c.d_e, c.D}, gen));
  wv = register_parameter("wv", at::normal(0.0, std, {c.d_e, c.D}, gen));
  gate_u = register_parameter("gate_u", torch::ones({c.D}));
  gate_k = register_parameter("gate_k", torch::ones({c.D}));
  conv_norm = register_parameter("conv_norm", torch::ones({c.D}));
  // Zero taps by default: the branch starts as the gated value x_t (its residual), since SiLU(conv(RMSNorm(x)))
  // of random taps would add unit-scale noise to a residual stream of scale init_std (docs/memory_layer.md).
  conv = register_parameter("conv", c.conv_std > 0 ? at::normal(0.0, c.conv_std, {c.D, c.kernel}, gen)
                                                   : torch::zeros({c.D, c.kernel}));
}

void EngramImpl::set_value_format(ValueFormat f) {
  if (f == format_) return;
  if (value_lookup_)
    throw std::logic_error("Engram::set_value_format: the table is sharded (set_value_lookup); consolidate the "
                           "checkpoint first");
  const auto [dst, scale] = convert_value_table("Engram::set_value_format: ", values, format_, f);
  set_value_table(dst, scale, /*read_only=*/false);
}

void EngramImpl::set_value_table(torch::Tensor v, torch::Tensor scale, bool read_only) {
  const std::string who = "Engram::set_value_table: ";
  if (value_lookup_)
    throw std::logic_error(who + "the table is sharded (set_value_lookup); consolidate the checkpoint first");
  const ValueFormat f = check_value_table(who, "[rows, d_e / (2*heads)]", v, scale, hash_.total_rows(),
                                          cfg_.row_width(), wk.scalar_type());
  install_value_table(*this, values, values_scale, format_, who, v, scale, f, read_only);
}

int64_t EngramImpl::value_bytes() const {
  int64_t b = values.numel() * int64_t(values.element_size());
  if (format_ == ValueFormat::kInt8) b += values_scale.numel() * int64_t(values_scale.element_size());
  return b;
}

EngramState EngramImpl::make_state(int64_t batch) const {
  EngramState s;
  s.tokens = torch::full({batch, 2}, kPad, torch::kLong);
  s.conv_input = torch::zeros({batch, cfg_.kernel - 1, cfg_.D}, wk.options().requires_grad(false));
  return s;
}

void EngramImpl::prefetch_rows(const torch::Tensor& tokens, const EngramState& state, int64_t max_bytes) const {
  if (max_bytes <= 0 || value_lookup_) return;
  const auto idx = rows(tokens, state.tokens);  // [B, T, 2*heads]
  ops::engram_prefetch_rows(values.data_ptr(), cfg_.row_width() * int64_t(values.element_size()),
                            format_ == ValueFormat::kInt8 ? values_scale.data_ptr<float>() : nullptr,
                            idx.data_ptr<int64_t>(), idx.numel(), max_bytes);
}

torch::Tensor EngramImpl::rows(const torch::Tensor& tokens, const torch::Tensor& history) const {
  return ops::engram_rows(hash_, tokens, history);
}

torch::Tensor EngramImpl::forward(const torch::Tensor& u, const torch::Tensor& tokens, EngramState* state) {
  const auto& c = cfg_;
  TORCH_CHECK(u.dim() == 3 && u.size(2) == c.D, "Engram: u must be [B, T, D=", c.D, "], got ", u.sizes());
  TORCH_CHECK(tokens.dim() == 2 && tokens.size(0) == u.size(0) && tokens.size(1) == u.size(1),
              "Engram: tokens must be [B, T] = ", u.sizes().slice(0, 2), ", got ", tokens.sizes());
  const int64_t B = u.size(0), T = u.size(1), P = c.kernel - 1;
  const auto idx = rows(tokens, state ? state->tokens : torch::Tensor());                 // [B, T, 2*heads]
  torch::Tensor out;
  if (!value_lookup_ && ops::no_grad_op_applies(u, wk)) {
    // Inference: the fused op (ops/engram_decode.h) on the local table in its stored format.
    ops::EngramDecodeWeights w;
    w.values = values.detach();
    if (format_ == ValueFormat::kInt8) w.values_scale = values_scale;
    w.wk = wk.detach();
    w.wv = wv.detach();
    w.gate_u = gate_u.detach();
    w.gate_k = gate_k.detach();
    w.conv_norm = conv_norm.detach();
    w.conv = conv.detach().contiguous();
    torch::Tensor cs = state ? state->conv_input.to(u.scalar_type()).contiguous()
                             : torch::zeros({B, P, c.D}, u.options());
    out = ops::engram_decode(u.contiguous(), idx, w, cs);
    if (state) state->conv_input.copy_(cs);
  } else {
    torch::Tensor e;                                                                       // [B, T, d_e]
    if (value_lookup_) {
      e = value_lookup_->gather_rows(values, idx.view({B * T, c.tables()}), c.sparse_value_grad).view({B, T, c.d_e});
    } else if (format_ == ValueFormat::kFloat32) {
      e = torch::embedding(values, idx.reshape({-1}), -1, false, c.sparse_value_grad).view({B, T, c.d_e});
    } else {
      TORCH_CHECK(!torch::GradMode::is_enabled(), "Engram: a ", to_string(format_),
                  " value table serves inference only (grad mode must be off)");
      e = gather_value_rows(values, values_scale, format_, idx.reshape({-1}), wk.scalar_type()).view({B, T, c.d_e});
    }
    const auto k = e.matmul(wk), v = e.matmul(wv);                                         // [B, T, D]
    const auto gate = (rms_norm(u, gate_u, kEps) * rms_norm(k, gate_k, kEps)).sum(-1, true);  // [B, T, 1]
    const auto alpha = torch::sigmoid(gate / std::sqrt(double(c.D)));
    const auto x = alpha * v;                                                              // [B, T, D]
    auto y = rms_norm(x, conv_norm, kEps);                                                 // [B, T, D]
    // Causal depthwise convolution: out_t = sum_i conv[:, i] * y_{t-i}, earlier inputs from the state.
    const auto before = state ? state->conv_input.to(y.scalar_type()) : torch::zeros({B, P, c.D}, y.options());
    const auto padded = torch::cat({before, y}, 1);                                        // [B, P + T, D]
    torch::Tensor acc = torch::zeros_like(y);
    for (int64_t i = 0; i < c.kernel; ++i) acc = acc + padded.narrow(1, P - i, T) * conv.select(1, i);
    if (state) state->conv_input.copy_(padded.narrow(1, T, P).detach());
    out = torch::silu(acc) + x;
  }
  // The state is updated in place: a slot view of a serving cache shares its rows.
  if (state) state->tokens.copy_(torch::cat({state->tokens, tokens}, 1).narrow(1, T, 2));
  return out;
}

}  // namespace ultramem::nn
