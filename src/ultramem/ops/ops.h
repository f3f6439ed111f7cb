// Differentiable UltraMem ops on CPU tensors (libtorch). The same functions are registered for
// Python under the `ultramem` namespace (register.cpp): torch.ops.ultramem.tdqkr / tdqkr_exact /
// pooled_lookup, and the fused no-grad layer forward ultramem_decode / fold_filter_keys (ultramem_decode.h).
#pragma once
#include <ATen/core/Tensor.h>

#include <tuple>

namespace ultramem::ops {

// Tucker-decomposed query-key retrieval (spec section 4): rank-1 filter to m_first rows and columns,
// exact rescoring of the m_first x m_first candidates with every core, top-m by the core sum.
// m_neg > 0 selects the two-sign filter (kernels/tdqkr.h): per side the m_first - m_neg largest and
// the m_neg most negative filter scores, the same-sign blocks rescored. u, v of shape [H, R, r] select
// the rank-R filter (1 <= R <= r, m_neg = 0): rows ranked by sum_k (u[h, k] . S[:, i])^2, all pairs
// rescored.
//   s_row, s_col: [T, H, r, n] float32/float64      cores: [C, H, r, r]      u, v: [H, r] or [H, R, r]
// Returns
//   scores: [T, H*m, C]  per-core exact scores of the kept candidates; head-major, each head's m
//                        sorted by the sum over cores, descending (ties: smaller grid address first)
//   index:  [T, H*m]     int64 grid addresses i*n + j
// Differentiable w.r.t. s_row, s_col and cores; u, v and the selection carry no gradient.
std::tuple<at::Tensor, at::Tensor> tdqkr(const at::Tensor& s_row, const at::Tensor& s_col,
                                         const at::Tensor& cores, const at::Tensor& u,
                                         const at::Tensor& v, int64_t m_first, int64_t m,
                                         int64_t m_neg = 0);

// The exact top-m over the whole n x n grid (what tdqkr approximates): same outputs and ordering as
// tdqkr, for measuring retrieval quality. No gradient. n*r*n multiply-adds per token and head.
std::tuple<at::Tensor, at::Tensor> tdqkr_exact(const at::Tensor& s_row, const at::Tensor& s_col,
                                               const at::Tensor& cores, int64_t m);

// Pooled value lookup with implicit value expansion and multi-core scoring (spec section 5).
//   values: [N, Dv]   index: [T, K] grid addresses in [0, E*N)   scores: [T, K, C]   perm: [E*N] int64
// Returns [T, E*Dv]: out[t, p*Dv + slice c] = sum over k with perm[index]/N == p of
// scores[t,k,c] * values[perm[index] % N, slice c].
// Differentiable w.r.t. values and scores. With sparse_grad the value gradient is a coalesced sparse
// COO tensor holding only the rows hit (as nn.Embedding(sparse=True)); otherwise it is dense [N, Dv].
at::Tensor pooled_lookup(const at::Tensor& values, const at::Tensor& index, const at::Tensor& scores,
                         const at::Tensor& perm, int64_t E, bool sparse_grad = false);

}  // namespace ultramem::ops
