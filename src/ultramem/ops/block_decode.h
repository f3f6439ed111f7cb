// The no-grad ops of a transformer block (inference and decode): what nn's RMSNorm, SwiGLU and
// CausalSelfAttention compute with autograd, on raw buffers and the project's kernels, without the
// per-op overhead of the libtorch expressions (a batch-1 decode step of the 4-block benchmark model ran
// about 40 libtorch ops per block; docs/performance.md, D.13). The modules call them when grad mode
// is off; the autograd expressions stay the training path. Results equal the autograd path's up to
// float rounding (the tests hold them together). A dtype, shape or layout mismatch is a c10::Error
// naming the argument, like the other ops'.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>

#include <cstdint>

namespace ultramem::ops {

// Whether a module takes its no-grad op for input x and weight w: grad mode off, and x and w of one
// dtype, float32 or float64 (anything else keeps the autograd expression).
inline bool no_grad_op_applies(const at::Tensor& x, const at::Tensor& w) {
  return !at::GradMode::is_enabled() && x.scalar_type() == w.scalar_type() &&
         (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble);
}

// y = x * rsqrt(mean(x^2) + eps) * weight, over the last dim. x: [T, D] float32/float64 contiguous;
// weight [D] of x's dtype. The mean of squares accumulates in float64.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

// y = (silu(x W_gate) * (x W_up)) W_down. x: [T, D]; w_in [D, 2*h] (gate | up); w_out [h, D].
at::Tensor swiglu_forward(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& w_out);

// y = x @ w^T: x [T, K]; w [N, K] read row by row (the LM head, tied to the embedding or not). Few
// rows use the dot-product kernel: BLAS would first pack all of w (an 8 MB head costs about twice its
// bytes that way at batch 1).
at::Tensor linear_nt(const at::Tensor& x, const at::Tensor& w);

// One decode step of causal self-attention with RoPE and a key/value cache: each of the B sequences
// adds one token at position `pos` (the same for all, as nn::KVCache keeps one length).
//   x       [B, D]               block input (after the norm)
//   wqkv    [D, 3*D]             query | key | value projections, heads contiguous inside each
//   wo      [D, D]               output projection
//   cos,sin [P, hd/2] float64    rotary tables (P > pos), "half-split" pairs (z[i], z[i + hd/2])
//   cache_k [B, nh, L, hd]       written at [.., pos, :] with the rotated key (L > pos); read [0, pos]
//   cache_v [B, nh, L, hd]       written at [.., pos, :] with the value
// Returns [B, D]. D = nh * hd, hd even.
at::Tensor attention_decode(const at::Tensor& x, const at::Tensor& wqkv, const at::Tensor& wo, const at::Tensor& cos,
                            const at::Tensor& sin, at::Tensor& cache_k, at::Tensor& cache_v, int64_t pos);

}  // namespace ultramem::ops
