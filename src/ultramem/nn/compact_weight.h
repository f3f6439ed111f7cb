// The compact inference copy of a float weight matrix (bf16, or int8 with one scale per output row)
// that the no-grad decode ops read instead of the parameter: a token reads 2 or 4x fewer weight bytes.
// set() rounds the parameter in place to the values the copy stands for, so every path (the decode
// ops, the libtorch expressions of prefill and eval, training) computes with the same weights; the
// copy is used only while the parameter is unchanged since (its version counter), so a model trained
// further falls back to the float parameter instead of reading stale rows.
#pragma once
#include <ATen/core/grad_mode.h>
#include <torch/types.h>

#include "ultramem/nn/memory_config.h"
#include "ultramem/ops/block_decode.h"

namespace ultramem::nn {

class CompactWeight {
 public:
  // param: [..., K, N] float32 (x @ param; transpose = true) or [..., N, K] (x @ param^T, e.g. the LM
  // head); leading dims (MoE experts) are kept. kFloat32 drops the copy (the parameter keeps its
  // rounded values).
  void set(torch::Tensor& param, ValueFormat format, bool transpose) {
    format_ = format;
    m_ = ops::Matrix();
    if (format == ValueFormat::kFloat32) return;
    TORCH_CHECK(param.scalar_type() == torch::kFloat32, "compact weights need float32 parameters, got ",
                param.scalar_type());
    at::NoGradGuard no_grad;
    const torch::Tensor rows = (transpose ? param.transpose(-2, -1) : param).contiguous();  // [..., N, K]
    const ops::Matrix flat = ops::compact_rows(rows.reshape({-1, rows.size(-1)}),
                                               format == ValueFormat::kBFloat16 ? "bf16" : "int8");
    const torch::Tensor widened = ops::widen_rows(flat).view(rows.sizes());
    m_.w = flat.w.view(rows.sizes());
    if (flat.scale.defined()) m_.scale = flat.scale.view(rows.sizes().slice(0, rows.dim() - 1));
    param.copy_(transpose ? widened.transpose(-2, -1) : widened);
    version_ = param._version();
  }
  // The matrix the decode ops take: the compact rows while `param` is unchanged since set() (same
  // version, still float32), else the parameter itself.
  ops::Matrix get(const torch::Tensor& param) const {
    if (format_ == ValueFormat::kFloat32 || !m_.w.defined() || param._version() != version_ ||
        param.scalar_type() != torch::kFloat32)
      return ops::Matrix(param);
    return m_;
  }
  ValueFormat format() const { return format_; }
  int64_t bytes() const { return m_.w.defined() ? m_.w.nbytes() + (m_.scale.defined() ? m_.scale.nbytes() : 0) : 0; }

 private:
  ValueFormat format_ = ValueFormat::kFloat32;
  ops::Matrix m_;
  int64_t version_ = 0;
};

}  // namespace ultramem::nn
