#include "ultramem/nn/engram.h"

#include <torch/torch.h>

#include <cmath>
#include <random>
#include <stdexcept>
#include <string>

namespace ultramem::nn {

namespace {

constexpr int64_t kPad = -1;  // the id of positions before the sequence's start (hashes as 0)

torch::Tensor rms(const torch::Tensor& x, const torch::Tensor& w) {
  return x * torch::rsqrt(x.pow(2).mean(-1, true) + 1e-6) * w;
}

}  // namespace

EngramImpl::EngramImpl(EngramConfig cfg) : cfg_(std::move(cfg)) {
  cfg_.validate();
  const auto& c = cfg_;
  int64_t total = 0;
  std::mt19937_64 rng(c.seed ^ 0x5851f42d4c957f2dULL);
  sizes_ = c.table_sizes();  // distinct primes: each table starts above the previous one
  for (const int64_t m : sizes_) {
    offsets_.push_back(total);
    total += m;
    salt_.push_back(rng());
    mul_.push_back(rng() | 1);
  }
  torch::Generator gen = at::detail::createCPUGenerator(c.seed);
  values = register_parameter("values", at::normal(0.0, c.value_std, {total, c.row_width()}, gen));
  const double std = 1.0 / std::sqrt(double(c.d_e));
  wk = register_parameter("wk", at::normal(0.0, std, {c.d_e, c.D}, gen));
  wv = register_parameter("wv", at::normal(0.0, std, {c.d_e, c.D}, gen));
  gate_u = register_parameter("gate_u", torch::ones({c.D}));
  gate_k = register_parameter("gate_k", torch::ones({c.D}));
  conv_norm = register_parameter("conv_norm", torch::ones({c.D}));
  // Starts as a small smoothing of the current position (the residual carries the gated value itself).
  conv = register_parameter("conv", at::normal(0.0, 1.0 / double(c.kernel), {c.D, c.kernel}, gen));
}

EngramState EngramImpl::make_state(int64_t batch) const {
  EngramState s;
  s.tokens = torch::full({batch, 2}, kPad, torch::kLong);
  s.conv_input = torch::zeros({batch, cfg_.kernel - 1, cfg_.D}, values.options().requires_grad(false));
  return s;
}

torch::Tensor EngramImpl::rows(const torch::Tensor& tokens, const torch::Tensor& history) const {
  TORCH_CHECK(tokens.dim() == 2 && tokens.scalar_type() == torch::kLong, "Engram: tokens must be [B, T] int64, got ",
              tokens.sizes());
  const int64_t B = tokens.size(0), T = tokens.size(1), J = cfg_.tables();
  const auto hist = history.defined() ? history.contiguous() : torch::full({B, 2}, kPad, torch::kLong);
  TORCH_CHECK(hist.sizes() == torch::IntArrayRef({B, 2}), "Engram: the history must be [B, 2], got ", hist.sizes());
  const auto seq = torch::cat({hist, tokens.contiguous()}, 1).contiguous();  // [B, T + 2]
  auto out = torch::empty({B, T, J}, torch::kLong);
  const int64_t* s = seq.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t* end = s + b * (T + 2) + t + 3;  // one past the current id (seq[b, t + 2])
      for (int64_t j = 0; j < J; ++j) {
        const int64_t n = j < cfg_.heads ? 2 : 3;      // tables 0..heads-1: 2-grams, then 3-grams
        uint64_t h = salt_[size_t(j)];
        for (int64_t i = n; i >= 1; --i) h = (h ^ uint64_t(end[-i] + 1)) * mul_[size_t(j)];
        h ^= h >> 29;
        o[(b * T + t) * J + j] = offsets_[size_t(j)] + int64_t(h % uint64_t(sizes_[size_t(j)]));
      }
    }
  return out;
}

torch::Tensor EngramImpl::forward(const torch::Tensor& u, const torch::Tensor& tokens, EngramState* state) {
  const auto& c = cfg_;
  TORCH_CHECK(u.dim() == 3 && u.size(2) == c.D, "Engram: u must be [B, T, D=", c.D, "], got ", u.sizes());
  TORCH_CHECK(tokens.dim() == 2 && tokens.size(0) == u.size(0) && tokens.size(1) == u.size(1),
              "Engram: tokens must be [B, T] = ", u.sizes().slice(0, 2), ", got ", tokens.sizes());
  const int64_t B = u.size(0), T = u.size(1);
  const auto idx = rows(tokens, state ? state->tokens : torch::Tensor());                 // [B, T, 2*heads]
  const auto e = torch::embedding(values, idx.reshape({-1}), -1, false, c.sparse_value_grad)
                     .view({B, T, c.d_e});                                                // [B, T, d_e]
  const auto k = e.matmul(wk), v = e.matmul(wv);                                         // [B, T, D]
  const auto alpha = torch::sigmoid((rms(u, gate_u) * rms(k, gate_k)).sum(-1, true) / std::sqrt(double(c.D)));
  const auto x = alpha * v;                                                              // [B, T, D]
  auto y = rms(x, conv_norm);                                                            // [B, T, D]
  // Causal depthwise convolution: out_t = sum_i conv[:, i] * y_{t-i}, earlier inputs from the state.
  const int64_t P = c.kernel - 1;
  const auto before = state ? state->conv_input.to(y.scalar_type()) : torch::zeros({B, P, c.D}, y.options());
  const auto padded = torch::cat({before, y}, 1);                                        // [B, P + T, D]
  torch::Tensor acc = torch::zeros_like(y);
  for (int64_t i = 0; i < c.kernel; ++i) acc = acc + padded.narrow(1, P - i, T) * conv.select(1, i);
  if (state) {
    state->tokens = torch::cat({state->tokens, tokens}, 1).narrow(1, T, 2).contiguous();
    state->conv_input = padded.narrow(1, T, P).detach().contiguous();
  }
  return torch::silu(acc) + x;
}

}  // namespace ultramem::nn
