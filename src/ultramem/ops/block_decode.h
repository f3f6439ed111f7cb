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
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <string>
#include <utility>

namespace ultramem::ops {

// A weight matrix as the no-grad ops read it. Float32/float64 [K, N] as trained (y = x @ w; for
// linear_nt [N, K], y = x @ w^T), or compact for inference: [N, K] rows, one per output, of bfloat16
// (dtype kBFloat16) or int8 (kChar) with one float32 scale per row in `scale` [N] (y = x @ w^T, row j
// read as q[j] * scale[j]). bf16 rows are read in place by the few-row kernels (up to 15 rows) and
// widened block by block for BLAS above. int8 rows up to 16 rows meet their input rounded to int8 per
// block of 32 and are taken in integer dot products (kernels::matmul_rows_q8, as CPU int8 engines do;
// docs/performance.md, D.15), and are widened for BLAS above. Made by compact_rows.
struct Matrix {
  Matrix() = default;
  Matrix(at::Tensor w_) : w(std::move(w_)) {}  // NOLINT: a float matrix converts implicitly
  Matrix(at::Tensor w_, at::Tensor scale_) : w(std::move(w_)), scale(std::move(scale_)) {}
  bool compact() const { return w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kChar; }
  at::Tensor w;      // [K, N] float, or [N, K] bfloat16 / int8
  at::Tensor scale;  // [N] float32 for int8; undefined otherwise
};

// rows [N, K] float32 -> compact Matrix in `format` "bf16" (round to nearest even) or "int8" (symmetric,
// one scale per row: max |row| / 127). std::invalid_argument for another format or a non-finite row.
Matrix compact_rows(const at::Tensor& rows, const std::string& format);
// The rows a compact Matrix stands for, [N, K] float32: exact for bf16, float(q) * scale for int8 (the
// kernels' widening).
at::Tensor widen_rows(const Matrix& m);

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
// The same with compact matrices (w_in [2*h, D] and w_out [D, h] rows when compact).
at::Tensor swiglu_forward(const at::Tensor& x, const Matrix& w_in, const Matrix& w_out);

// y = x @ w^T: x [T, K]; w [N, K] read row by row (the LM head, tied to the embedding or not). Few
// rows use the dot-product kernel: BLAS would first pack all of w (an 8 MB head costs about twice its
// bytes that way at batch 1).
at::Tensor linear_nt(const at::Tensor& x, const at::Tensor& w);
// The same for a compact w ([N, K] rows, bf16 or int8 with scales) or a float one.
at::Tensor linear_nt(const at::Tensor& x, const Matrix& w);

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
// The same with compact wqkv and wo ([3*D, D] and [D, D] rows) or float ones.
at::Tensor attention_decode(const at::Tensor& x, const Matrix& wqkv, const Matrix& wo, const at::Tensor& cos,
                            const at::Tensor& sin, at::Tensor& cache_k, at::Tensor& cache_v, int64_t pos);
// Continuous batching: sequence b has its own cache slot and position. cache_k and cache_v are
// [S, nh, L, hd] (S slots); the token of row b is rotated at positions[b], written to
// cache_k[slots[b], :, positions[b]] and attends over [0, positions[b]] of its slot.
//   slots      [B]   distinct, in [0, S)
//   positions  [B]   in [0, min(L, P))
// The uniform form above is this one with slots 0..B-1 and every position `pos`. A row's result does
// not depend on the other rows (each head attends alone; the projections are per row: see
// ultramem::set_batch_invariant in ops/runtime.h).
at::Tensor attention_decode(const at::Tensor& x, const Matrix& wqkv, const Matrix& wo, const at::Tensor& cos,
                            const at::Tensor& sin, at::Tensor& cache_k, at::Tensor& cache_v, at::IntArrayRef slots,
                            at::IntArrayRef positions);

}  // namespace ultramem::ops
