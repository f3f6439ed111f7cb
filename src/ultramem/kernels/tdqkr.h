// TDQKR: Tucker-decomposed query-key retrieval kernels (spec section 4).
//
// Plain C++ on raw, contiguous, row-major buffers. No model knowledge, no libtorch.
// Every kernel has a scalar reference (`*_ref`) with the same contract, used by the tests.
//
// Ordering contract (shared by kernels, references and brute force, so results are exactly comparable):
// candidates are ranked by score descending; equal scores by smaller index first; NaN ranks last.
#pragma once
#include <cstdint>

namespace ultramem::kernels {

struct TdqkrShape {
  int64_t T = 0;        // tokens
  int64_t H = 1;        // key sets (heads)
  int64_t r = 2;        // Tucker rank
  int64_t n = 0;        // keys per side; the grid has n*n slots
  int64_t C = 1;        // Tucker cores (multi-core scoring)
  int64_t m_first = 0;  // first-stage candidates per side, 1 <= m_first <= n
  int64_t m = 0;        // final top-m per head, 1 <= m <= (rescored pairs, see below)
  // Two-sign filter (0: the paper's filter). Of the m_first candidates per side, the first
  // m_pos = m_first - m_neg are the largest filter scores and the last m_neg the most negative ones
  // among the rest; only the same-sign blocks (m_pos x m_pos and m_neg x m_neg pairs) are rescored, so
  // m <= m_pos^2 + m_neg^2. 0 <= m_neg < m_first. With m_neg = 0 all m_first^2 pairs are rescored.
  int64_t m_neg = 0;
  // Rank-R filter (0: the signed rank-1 filter above). u and v are [H, R, r]: R filter scores per side,
  // F_k[i] = sum_a u[h, k, a] S[a, i], and the m_first rows with the largest sum_k F_k[i]^2 are kept (by
  // Cauchy-Schwarz the rank-R grid score |sum_k F_k[i] G_k[j]| is at most the product of the two norms).
  // All m_first^2 pairs are rescored. 1 <= R <= r; m_neg must be 0.
  int64_t filter_rank = 0;
  int64_t filter_vectors() const { return filter_rank > 0 ? filter_rank : 1; }  // R of u's [H, R, r]
  int64_t m_pos() const { return m_first - m_neg; }
  int64_t rescored_pairs() const { return m_neg == 0 ? m_first * m_first : m_pos() * m_pos() + m_neg * m_neg; }
};

// Returns nullptr when the shape is valid, else a static message naming the offending field.
const char* tdqkr_check_shape(const TdqkrShape& s);

// Stage 1, rank-1 filter: f_row[i] = sum_a u[h,a] * s_row[t,h,a,i]; keep the top m_first rows (same for
// cols); with m_neg > 0 the top m_pos, then the m_neg most negative of the rest (most negative first);
// with filter_rank = R > 0 the top m_first by sum_k (sum_a u[h,k,a] * s_row[t,h,a,i])^2.
template <typename T>
void tdqkr_filter(const TdqkrShape& s,
                  const T* s_row,     // [T, H, r, n]
                  const T* s_col,     // [T, H, r, n]
                  const T* u,         // [H, r], or [H, R, r] with filter_rank = R > 0
                  const T* v,         // [H, r], or [H, R, r]
                  int32_t* idx_row,   // [T, H, m_first] out: kept rows, best first
                  int32_t* idx_col);  // [T, H, m_first] out: kept cols, best first

// Stage 2, exact rescoring of the m_first x m_first candidates (with m_neg > 0: of the same-sign blocks
// only) with all C cores; keep top-m by the core sum. Per-core scores of the kept candidates and their grid addresses i*n + j are written.
template <typename T>
void tdqkr_rescore(const TdqkrShape& s,
                   const T* s_row,          // [T, H, r, n]
                   const T* s_col,          // [T, H, r, n]
                   const T* cores,          // [C, H, r, r]
                   const int32_t* idx_row,  // [T, H, m_first]
                   const int32_t* idx_col,  // [T, H, m_first]
                   T* scores,               // [T, H*m, C] out: per-core scores, head-major, best first
                   int64_t* index);         // [T, H*m] out: grid addresses

// Both stages fused per token (no [T, H, m_first] intermediates). Same results as filter + rescore.
template <typename T>
void tdqkr_forward(const TdqkrShape& s,
                   const T* s_row,   // [T, H, r, n]
                   const T* s_col,   // [T, H, r, n]
                   const T* cores,   // [C, H, r, r]
                   const T* u,       // [H, r], or [H, R, r] with filter_rank = R > 0
                   const T* v,       // [H, r], or [H, R, r]
                   T* scores,        // [T, H*m, C] out
                   int64_t* index);  // [T, H*m] out

// Backward of the kept per-core scores G_c(k) = sum_ab s_row[a,i] core_c[a,b] s_col[b,j].
// ds_row / ds_col are overwritten (rows never kept get zero). dcores is overwritten; it is summed
// over tokens in fixed-size chunks in a fixed order, so it does not depend on the thread count.
template <typename T>
void tdqkr_backward(const TdqkrShape& s,
                    const T* s_row,         // [T, H, r, n]
                    const T* s_col,         // [T, H, r, n]
                    const T* cores,         // [C, H, r, r]
                    const int64_t* index,   // [T, H*m]
                    const T* dscores,       // [T, H*m, C]
                    T* ds_row,              // [T, H, r, n] out
                    T* ds_col,              // [T, H, r, n] out
                    T* dcores);             // [C, H, r, r] out

// Exact top-m over the whole n x n grid (what TDQKR approximates; retrieval telemetry): top-m of
// sum_c G_c(i, j). Ignores m_first and m_neg; m <= n*n. Same results as tdqkr_bruteforce_ref.
template <typename T>
void tdqkr_exact(const TdqkrShape& s,
                 const T* s_row,   // [T, H, r, n]
                 const T* s_col,   // [T, H, r, n]
                 const T* cores,   // [C, H, r, r]
                 T* scores,        // [T, H*m, C] out: per-core scores, best first
                 int64_t* index);  // [T, H*m] out: grid addresses

// ---- scalar references ------------------------------------------------------------------------
template <typename T>
void tdqkr_filter_ref(const TdqkrShape& s, const T* s_row, const T* s_col, const T* u, const T* v,
                      int32_t* idx_row, int32_t* idx_col);
template <typename T>
void tdqkr_rescore_ref(const TdqkrShape& s, const T* s_row, const T* s_col, const T* cores,
                       const int32_t* idx_row, const int32_t* idx_col, T* scores, int64_t* index);
template <typename T>
void tdqkr_backward_ref(const TdqkrShape& s, const T* s_row, const T* s_col, const T* cores,
                        const int64_t* index, const T* dscores, T* ds_row, T* ds_col, T* dcores);

// Brute force over the whole n x n grid (what TDQKR approximates): top-m of sum_c G_c(i, j).
// Ignores m_first. Same output layout and ordering as tdqkr_rescore.
template <typename T>
void tdqkr_bruteforce_ref(const TdqkrShape& s, const T* s_row, const T* s_col, const T* cores,
                          T* scores,        // [T, H*m, C]
                          int64_t* index);  // [T, H*m]

}  // namespace ultramem::kernels
