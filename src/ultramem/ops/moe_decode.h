// The MoE feed-forward's no-grad forward as one op (inference and decode): what nn::MoE computes
// with autograd, reading only the experts some token is routed to, one product per used expert
// (few-row kernels for small groups, BLAS otherwise), without the per-op overhead of the autograd
// path. The fair baseline of the decode benchmark's UltraMem vs MoE comparison.
//
//   probs = softmax(x @ router); the top_k experts of each token (ties: the smaller expert index),
//   their probabilities renormalised to sum to 1 when top_k > 1;
//   out[t] = sum over t's experts e, ascending, of w[t, e] * swiglu(x[t], w_in[e], w_out[e]).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

#include "ultramem/ops/block_decode.h"

namespace ultramem::ops {

struct MoeDecodeStats {
  at::Tensor counts;      // [K] int64  assignments per expert
  at::Tensor mean_probs;  // [K]        router probability per expert, mean over tokens
};

// x: [T, D] float32/float64 contiguous; router [D, K]; w_in [K, D, 2*h] (gate | up); w_out [K, h, D];
// 1 <= top_k <= K. Returns [T, D]; *stats (when given) receives what the balance loss needs. A dtype
// or shape mismatch is a c10::Error naming the argument.
at::Tensor moe_decode(const at::Tensor& x, const at::Tensor& router, const at::Tensor& w_in, const at::Tensor& w_out,
                      int64_t top_k, MoeDecodeStats* stats = nullptr);
// The same with expert matrices that may be compact (ops::Matrix): rows [K, 2*h, D] and [K, D, h] in
// bf16, or int8 with scales [K, 2*h] and [K, D].
at::Tensor moe_decode(const at::Tensor& x, const at::Tensor& router, const Matrix& w_in, const Matrix& w_out,
                      int64_t top_k, MoeDecodeStats* stats = nullptr);

}  // namespace ultramem::ops
