// The Engram layer's no-grad forward as one op (inference and decode): what nn::Engram computes with
// autograd (nn/engram.h), on raw buffers with the decode ops' products, for B sequences of T tokens.
//
//   e_t = the J rows of the stacked table, side by side (float32, or bf16 / int8 widened)   [d_e]
//   k_t = e_t Wk, v_t = e_t Wv                                                           [D] each
//   alpha_t = sigmoid(<RMSNorm(u_t) * gate_u, RMSNorm(k_t) * gate_k> / sqrt(D)),  x_t = alpha_t v_t
//   y_t = RMSNorm(x_t) * conv_norm,  out_t = SiLU(sum_i conv[:, i] * y_{t-i}) + x_t
//
// The convolution reads the kernel-1 inputs before the first position from the state (zeros at a
// sequence start) and leaves the last kernel-1 there. Each sequence's rows do not depend on the other
// sequences' (the products take the row kernels under ultramem::batch_invariant(), ops/runtime.h), so
// the serving scheduler gets the same bits alone and batched. Results equal the autograd path's up to
// float rounding. A dtype, shape or layout mismatch is a c10::Error naming the argument.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>

namespace ultramem::ops {

struct EngramDecodeWeights {
  at::Tensor values;        // [rows, w]   the stacked tables: the compute dtype, bfloat16, or int8
  at::Tensor values_scale;  // [rows]      float32 row scales of an int8 table; undefined otherwise
  at::Tensor wk, wv;        // [d_e, D]    d_e = J * w
  at::Tensor gate_u, gate_k, conv_norm;  // [D] RMSNorm scales
  at::Tensor conv;          // [D, kernel] depthwise taps; conv[:, 0] weighs the current position
};

// u: [B, T, D] contiguous float32/float64 (the layer's input); rows: [B, T, J] int64 row ids into the
// stacked table (ops::engram_rows; checked against the table's rows); conv_state: [B, kernel-1, D] of u's
// dtype, read and then overwritten with the last kernel-1 convolution inputs. -> [B, T, D].
at::Tensor engram_decode(const at::Tensor& u, const at::Tensor& rows, const EngramDecodeWeights& w,
                         at::Tensor& conv_state);

// The same with the weights as separate tensors, as registered for Python (torch.ops.ultramem.engram_decode;
// conv_state is written in place).
at::Tensor engram_decode_op(const at::Tensor& u, const at::Tensor& rows, const at::Tensor& values,
                            const c10::optional<at::Tensor>& values_scale, const at::Tensor& wk, const at::Tensor& wv,
                            const at::Tensor& gate_u, const at::Tensor& gate_k, const at::Tensor& conv_norm,
                            const at::Tensor& conv, at::Tensor& conv_state);

}  // namespace ultramem::ops
