// Pooled value lookup with implicit value expansion (IVE) and multi-core scoring (MCS), spec section 5.
//
// For token t and kept candidate k with grid address g = index[t,k]:
//   v = perm[g], group p = v / N, row = v % N,
//   out[t, p*Dv + c*Ds + d] += scores[t,k,c] * values[row, c*Ds + d]     (Ds = Dv / C)
// i.e. slice c of every value is weighted by the candidate's core-c score and summed per group.
// The virtual table (E*N rows) is never built; each value row is read once per hit.
#pragma once
#include <cstdint>
#include <vector>

namespace ultramem::kernels {

struct PoolShape {
  int64_t T = 0;   // tokens
  int64_t K = 0;   // kept candidates per token (H*m)
  int64_t N = 0;   // physical value rows
  int64_t Dv = 0;  // value width
  int64_t E = 1;   // IVE groups; grid addresses lie in [0, E*N)
  int64_t C = 1;   // MCS slices; Dv % C == 0
};

// Returns nullptr when valid, else a static message naming the offending field.
const char* pool_check_shape(const PoolShape& s);

// Forward. out is overwritten. The three forwards also take perm == nullptr: the identity, index then
// holds resolved addresses v = p * N + row (a table in a row cache, whose rows were resolved before).
template <typename T>
void pooled_lookup_forward(const PoolShape& s,
                           const T* values,        // [N, Dv]
                           const int64_t* index,   // [T, K] grid addresses in [0, E*N)
                           const T* scores,        // [T, K, C]
                           const int64_t* perm,    // [E*N] permutation of [0, E*N)
                           T* out);                // [T, E*Dv] out

// The same forward over value tables stored for inference (value_quant.h): bf16 bits, or int8 with a
// per-row scale (value = q * row_scale). The row scale is folded into the score first:
//   out[t, p*Dv + c*Ds + d] += (scores[t,k,c] * row_scale[row]) * q[row, c*Ds + d]
// Forward only (these tables are not trained). out is overwritten.
template <typename T>
void pooled_lookup_forward_bf16(const PoolShape& s,
                                const uint16_t* values,  // [N, Dv] bf16 bits
                                const int64_t* index,    // [T, K]
                                const T* scores,         // [T, K, C]
                                const int64_t* perm,     // [E*N]
                                T* out);                 // [T, E*Dv] out
template <typename T>
void pooled_lookup_forward_int8(const PoolShape& s,
                                const int8_t* values,     // [N, Dv]
                                const float* row_scale,   // [N]
                                const int64_t* index,     // [T, K]
                                const T* scores,          // [T, K, C]
                                const int64_t* perm,      // [E*N]
                                T* out);                  // [T, E*Dv] out

// Prefetches the value rows a forward over `index` will read (and, int8, their row scales), for a
// lookup that runs later: a memory placed i:j knows its rows after block i's retrieval and reads them
// after block j. Resolves the permutation (those lines stay cached for the forward too) and issues
// one prefetch per 64-byte line of each row, in hit order, until `max_bytes` of rows were requested;
// reads nothing else and writes nothing. values: the stored table, row_bytes per row.
void pooled_lookup_prefetch(const PoolShape& s,
                            const void* values,      // [N, row_bytes] any stored format
                            int64_t row_bytes,
                            const float* row_scale,  // [N] int8 row scales, or nullptr
                            const int64_t* index,    // [T, K]
                            const int64_t* perm,     // [E*N]
                            int64_t max_bytes);

// Gradient w.r.t. scores: dscores[t,k,c] = <values[row, slice c], dout[t, p*Dv + slice c]>. Overwrites.
template <typename T>
void pooled_lookup_backward_scores(const PoolShape& s,
                                   const T* values,       // [N, Dv]
                                   const int64_t* index,  // [T, K]
                                   const int64_t* perm,   // [E*N]
                                   const T* dout,         // [T, E*Dv]
                                   T* dscores);           // [T, K, C] out

// The T*K hits of a batch grouped by physical row (CSR layout), for the race-free value gradient.
struct RowGroups {
  std::vector<int64_t> rows;     // [U] distinct physical rows hit, ascending
  std::vector<int64_t> offsets;  // [U+1] entries of rows[u] are entries[offsets[u] : offsets[u+1]]
  std::vector<int64_t> entries;  // [T*K] flat hit ids t*K + k, ascending within each row
  std::vector<int32_t> groups;   // [T*K] IVE group p of each entry, same order as entries
};

// Groups the hits by row (stable radix sort; deterministic).
void group_hits_by_row(const PoolShape& s,
                       const int64_t* index,  // [T, K]
                       const int64_t* perm,   // [E*N]
                       RowGroups& out);

// Row-sparse value gradient: grad_rows[u, :] = sum over hits of rows[u] of the weighted dout slices,
// summed in hit order (deterministic and independent of the thread count). Overwrites grad_rows.
template <typename T>
void pooled_lookup_backward_values(const PoolShape& s,
                                   const RowGroups& groups,
                                   const T* scores,       // [T, K, C]
                                   const T* dout,         // [T, E*Dv]
                                   T* grad_rows);         // [U, Dv] out, U = groups.rows.size()

// ---- scalar references ------------------------------------------------------------------------
template <typename T>
void pooled_lookup_forward_ref(const PoolShape& s, const T* values, const int64_t* index,
                               const T* scores, const int64_t* perm, T* out);
template <typename T>
void pooled_lookup_forward_bf16_ref(const PoolShape& s, const uint16_t* values, const int64_t* index,
                                    const T* scores, const int64_t* perm, T* out);
template <typename T>
void pooled_lookup_forward_int8_ref(const PoolShape& s, const int8_t* values, const float* row_scale,
                                    const int64_t* index, const T* scores, const int64_t* perm, T* out);
template <typename T>
void pooled_lookup_backward_scores_ref(const PoolShape& s, const T* values, const int64_t* index,
                                       const int64_t* perm, const T* dout, T* dscores);
// Dense value gradient [N, Dv] (overwritten), accumulated hit by hit.
template <typename T>
void pooled_lookup_backward_values_dense_ref(const PoolShape& s, const int64_t* index,
                                             const T* scores, const int64_t* perm, const T* dout,
                                             T* dvalues);

}  // namespace ultramem::kernels
