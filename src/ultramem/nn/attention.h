// Causal multi-head self-attention with rotary position embeddings (RoPE) and an optional key/value
// cache for incremental decoding. Plain matmul + softmax with a causal mask.
#pragma once
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <vector>

#include "ultramem/nn/compact_weight.h"

namespace ultramem::nn {

struct AttentionOptions {
  int64_t d_model = 256;
  int64_t n_heads = 4;          // d_model % n_heads == 0, even head dim
  int64_t max_seq_len = 256;    // positions the RoPE tables cover
  double rope_theta = 10000.0;
  double dropout = 0.0;         // on the attention probabilities, in training mode
  double init_std = 0.02;       // wqkv ~ N(0, init_std)
  double out_std = 0.02;        // wo ~ N(0, out_std)
};

class CausalSelfAttentionImpl : public torch::nn::Module {
 public:
  CausalSelfAttentionImpl(const AttentionOptions& o, at::Generator gen);

  // x: [B, T, D] at positions [pos0, pos0 + T) -> [B, T, D].
  // Without a cache, pos0 must be 0 and the T tokens attend causally among themselves. With a cache
  // (cache_k, cache_v: [B, n_heads, max_len, head_dim]), the new keys and values are written at
  // [pos0, pos0 + T) and the queries attend to every cached position up to their own.
  torch::Tensor forward(const torch::Tensor& x, int64_t pos0 = 0, torch::Tensor* cache_k = nullptr,
                        torch::Tensor* cache_v = nullptr);

  // Continuous batching: x [B, 1, D], one token per sequence; sequence b is row slots[b] of the caches
  // (cache_k, cache_v: [S, n_heads, max_len, head_dim]) and its token sits at positions[b]. Writes each
  // new key and value there and attends over [0, positions[b]] of its row. -> [B, 1, D]. Under no grad
  // (float32/float64) the decode op (ops::attention_decode with slots); otherwise forward() row by row.
  torch::Tensor forward_slots(const torch::Tensor& x, const std::vector<int64_t>& slots,
                              const std::vector<int64_t>& positions, torch::Tensor& cache_k, torch::Tensor& cache_v);

  int64_t head_dim() const { return head_dim_; }

  // Compact copies of wqkv and wo for the decode op (nn/compact_weight.h): rounds them in place.
  void set_weight_format(ValueFormat f) {
    wqkv_c_.set(wqkv, f, true);
    wo_c_.set(wo, f, true);
  }
  int64_t compact_bytes() const { return wqkv_c_.bytes() + wo_c_.bytes(); }

  torch::Tensor wqkv;  // [D, 3*D]  query | key | value projections (heads contiguous inside each)
  torch::Tensor wo;    // [D, D]    output projection

 private:
  // x: [B, n_heads, T, head_dim] rotated by the angles of positions [pos0, pos0 + T).
  torch::Tensor rope(const torch::Tensor& x, int64_t pos0) const;

  AttentionOptions o_;
  int64_t head_dim_;
  torch::Tensor cos_, sin_;  // [max_seq_len, head_dim / 2] float64, not registered (recomputable)
  CompactWeight wqkv_c_, wo_c_;  // [3*D, D] and [D, D] compact rows, when a weight format is set
};
TORCH_MODULE(CausalSelfAttention);

}  // namespace ultramem::nn
