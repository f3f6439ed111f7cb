// The UltraMem layer forward (spec sections 3-5) written with plain libtorch ops only (matmul,
// einsum, topk, gather, index_select, index_add): the baseline the fused ops and kernels are measured
// against (`ultramem bench decode`, bench/bench_layer.cpp). Same inputs, parameters and results as
// nn::UltraMem::forward up to float rounding; no custom op or kernel is called.
#pragma once
#include <torch/types.h>

#include <tuple>

namespace ultramem::nn {
class UltraMemImpl;
}

namespace ultramem::perf::plain {

// Pooled lookup with IVE and MCS: perm.index_select -> (row, group), values.index_select (or a
// sparse-gradient embedding), per-slice score weighting, index_add into [T*E, Dv].
//   values: [N, Dv]  index: [T, K] grid addresses in [0, E*N)  scores: [T, K, C]  perm: [E*N] int64
// Returns [T, E*Dv].
torch::Tensor pooled_lookup(const torch::Tensor& values, const torch::Tensor& index, const torch::Tensor& scores,
                            const torch::Tensor& perm, int64_t E, bool sparse_grad = false);

// TDQKR: rank-1 filter (einsum + topk of m_first per side), exact rescoring of the m_first^2
// candidates with every core (einsum), top-m by the core sum.
//   s_row, s_col: [T, H, r, n]  cores: [C, H, r, r]  u, v: [H, r]
// Returns scores [T, H*m, C] and grid addresses [T, H*m] (int64), ordered as ops::tdqkr.
std::tuple<torch::Tensor, torch::Tensor> tdqkr(const torch::Tensor& s_row, const torch::Tensor& s_col,
                                               const torch::Tensor& cores, const torch::Tensor& u,
                                               const torch::Tensor& v, int64_t m_first, int64_t m);

// The layer's keys normalised over Dk (the layer's norm kind and k_scale).
struct NormalisedKeys {
  torch::Tensor row;  // [H, n, r, Dk]
  torch::Tensor col;  // [H, n, r, Dk]
};
NormalisedKeys normalise_keys(const nn::UltraMemImpl& layer);

// Query halves, each normalised with the layer's q_scale. x: [T, D] -> row, col: [T, Dk].
std::tuple<torch::Tensor, torch::Tensor> query(const nn::UltraMemImpl& layer, const torch::Tensor& x);

// S[t, h, a, i] = <q[t], kn[h, i, a, :]>. q: [T, Dk], kn: [H, n, r, Dk] -> [T, H, r, n].
torch::Tensor side_scores(const torch::Tensor& q, const torch::Tensor& kn);

// The whole layer: x [..., D] -> [..., D]. keys: normalised keys computed once by the caller (as an
// inference path caches them); null: normalised in this call (as a training forward does).
torch::Tensor ultramem_forward(const nn::UltraMemImpl& layer, const torch::Tensor& x,
                               const NormalisedKeys* keys = nullptr);

}  // namespace ultramem::perf::plain
