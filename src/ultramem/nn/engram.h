// Engram (spec section 12): a memory addressed by the token ids themselves. Its rows depend only on
// tokens, so a decoder knows them before the forward pass (they can be read ahead a step early).
//
//   for order n in {2, 3}, head k:  row_{n,k}(t) = hash_{n,k}(tokens[t-n+1 .. t]) mod M_{n,k}
//   e_t = concat of the 2*heads rows                      [d_e]     (values: one table, tables stacked)
//   k_t = e_t Wk, v_t = e_t Wv                            [D] each
//   alpha_t = sigmoid(<RMSNorm(u_t) * gate_u, RMSNorm(k_t) * gate_k> / sqrt(D))    u: the layer's input
//   x_t = alpha_t * v_t
//   out_t = SiLU(conv_t(RMSNorm(x) * conv_norm)) + x_t    causal depthwise convolution of `kernel` taps
//
// Positions before the sequence's start hash a padding id. The hash of a window (t_1 .. t_n) for table j:
// h = salt_j; for each id: h = (h ^ (id + 1)) * mul_j (64-bit, odd mul_j); h ^= h >> 29; row = h mod M_j.
// Salts, multipliers and the prime sizes follow from the config (seed, rows): ops/engram_rows.h, which
// Python calls too (torch.ops.ultramem.engram_rows).
#pragma once
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "ultramem/nn/memory_config.h"
#include "ultramem/nn/value_lookup.h"
#include "ultramem/ops/engram_rows.h"

namespace ultramem::nn {

// What a decoder keeps between steps: the last tokens (for the 3-gram) and the convolution's last inputs.
struct EngramState {
  torch::Tensor tokens;      // [B, 2] int64, the two latest ids (padding ids before any token)
  torch::Tensor conv_input;  // [B, kernel - 1, D], the latest normalised gated values (zeros before any)
};

class EngramImpl : public torch::nn::Module {
 public:
  explicit EngramImpl(EngramConfig cfg);

  // u: [B, T, D] the layer's input (gate), tokens: [B, T] int64 -> [B, T, D]. With `state` the T tokens
  // continue the sequence the state holds (decoding), and the state is updated; without, they start it.
  torch::Tensor forward(const torch::Tensor& u, const torch::Tensor& tokens, EngramState* state = nullptr);

  // A fresh decoding state for `batch` sequences.
  EngramState make_state(int64_t batch) const;

  // Reads ahead: requests into cache up to max_bytes of the table rows that forward(u, tokens, &state)
  // will read (tokens [B, T] continuing `state`), which are known from the token ids alone. A decoder
  // calls it when the step's tokens are sampled, before the blocks below the memory run. Local tables
  // only (a no-op with a value lookup installed).
  void prefetch_rows(const torch::Tensor& tokens, const EngramState& state, int64_t max_bytes) const;

  // Rows of the stacked table each position reads: [B, T, 2*heads] int64 (tokens [B, T]; `history` [B, 2]
  // the two ids before them, or undefined for a sequence start).
  torch::Tensor rows(const torch::Tensor& tokens, const torch::Tensor& history = {}) const;

  // The table's storage (nn/value_table.h): float32 (trainable), or bf16 / int8 with a per-row scale for
  // inference (forward then needs grad mode off). set_value_table installs a stored table as it is
  // (read_only: a mapped file, never written).
  void set_value_format(ValueFormat f);
  void set_value_table(torch::Tensor values, torch::Tensor scale, bool read_only);
  ValueFormat value_format() const { return format_; }

  // Replaces the table read (torch::embedding) by `lookup`'s gather_rows, e.g. dist::ShardedValueLookup,
  // for which `values` holds only this process's column slice [rows, row_width/W] (float32, trainable).
  void set_value_lookup(std::shared_ptr<ValueLookup> lookup) { value_lookup_ = std::move(lookup); }
  const std::shared_ptr<ValueLookup>& value_lookup() const { return value_lookup_; }
  int64_t value_bytes() const;  // the table and its scales

  const EngramConfig& config() const { return cfg_; }
  const std::vector<int64_t>& table_sizes() const { return hash_.sizes; }      // M_j, primes
  const std::vector<int64_t>& table_offsets() const { return hash_.offsets; }  // first row of table j

  torch::Tensor values;     // [sum_j M_j, d_e / (2*heads)]  the stacked tables (float32, bf16 or int8)
  torch::Tensor values_scale;  // [sum_j M_j] float32 per-row scale; a buffer once the table is int8
  torch::Tensor wk, wv;     // [d_e, D]
  torch::Tensor gate_u, gate_k, conv_norm;  // [D] RMSNorm scales
  torch::Tensor conv;       // [D, kernel] depthwise taps; conv[:, 0] weighs the current position

 private:
  EngramConfig cfg_;
  ops::EngramHash hash_;
  ValueFormat format_ = ValueFormat::kFloat32;
  std::shared_ptr<ValueLookup> value_lookup_;  // replaces torch::embedding when set
};
TORCH_MODULE(Engram);

}  // namespace ultramem::nn
