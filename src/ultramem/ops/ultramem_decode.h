// The UltraMem layer's no-grad forward as one fused op (inference and decode): what nn::UltraMem
// computes with autograd, on raw buffers and with the layer's kernels, for any number of tokens.
//
//   q = x @ Wq, its row and col halves normalised with q_scale     (few rows: kernels::matmul_rows)
//   TDQKR's rank-1 filter against folded keys: f_row = q_row @ Kf_row^T, Kf_row[h, i] = sum_a u[h, a]
//     Kn_row[h, a, i] (prepared once by fold_filter_keys), so the key scan reads H*n, not H*r*n rows
//     (the rank-R filter: R folded key sets, H*R*n rows);
//   the exact S_side[t, h, a, i] only at the m_first kept rows, the exact rescoring with every core,
//   the pooled lookup over the stored value table (fp32, bf16 or int8), out = pooled @ Wo.
// UltraMemV2's switches (spec section 11) run in the same op: one query per Tucker rank (the filter then
// scans folded keys of width r*Dk against the concatenated rank queries, the same bytes as V1's rows of
// Dk), pre-values (each kept slot's scores weighted by <x Wp, pre_values[row]>) and one projection (the E
// pools summed before Wo).
// Larger batches use BLAS (libtorch's mm) for the three products. The result equals the autograd
// path's up to float rounding; where two filter scores tie to within rounding the kept candidate may
// differ.
#pragma once
#include <ATen/core/Tensor.h>

#include <c10/util/Optional.h>

#include <cstdint>
#include <memory>
#include <string>
#include <tuple>

#include "ultramem/ops/tiered_values.h"

namespace ultramem::ops {

// Sizes and settings of the layer (nn::UltraMemConfig's fields of the same names).
struct UltraMemDims {
  int64_t D = 0, Dk = 0, Dv = 0;  // model width, key width, value width
  int64_t H = 0, r = 0, n = 0;    // heads, Tucker rank, keys per side
  int64_t C = 0, E = 0;           // cores, IVE expansion
  int64_t m = 0, m_first = 0;     // kept candidates per head, first-stage candidates per side
  int64_t m_neg = 0;              // two-sign filter: candidates per side from the negative end (0: rank-1)
  int64_t filter_rank = 0;        // rank-R filter: R folded key sets (0: the signed rank-1 filter)
  bool rms_norm = true;           // query normalisation: RMS (else LayerNorm), eps 1e-6
  bool query_per_rank = false;    // V2: one Dk query per Tucker rank and side (wq [D, 2*r*Dk])
  bool single_projection = false; // V2: the E pools summed, one projection (wo [Dv, D])
  int64_t Dp = 0;                 // V2: pre-value width (0: no pre-values)
  int64_t N() const { return n * n / E; }
  int64_t filter_vectors() const { return filter_rank > 0 ? filter_rank : 1; }  // key sets in kf
  int64_t query_width() const { return query_per_rank ? r * Dk : Dk; }          // query values per side
  int64_t wo_rows() const { return single_projection ? Dv : E * Dv; }
  bool v2() const { return query_per_rank || single_projection || Dp > 0; }
};

// Keys prepared for the fused forward, once per change of the keys, their scales or the filter.
// The key tables are in the compute dtype, or compact (compact_keys): bfloat16, or int8 with one
// float32 scale per key row (key = q * scale); scores always accumulate in the compute dtype.
struct UltraMemDecodeKeys {
  at::Tensor kn;        // [2, H*r*n, Dk] normalised keys (row side, col side), rows ordered (h, a, i)
  at::Tensor kf;        // [2, H*R*n, Dk] filter keys: sum_a u[h, k, a] kn_row[h, a, i], rows ordered (h, k, i);
                        //                v for the col side; R = 1 for the signed rank-1 filter.
                        // [2, H*R*n, r*Dk] with one query per rank: the r terms side by side,
                        //                (u[h, k, a] kn_row[h, a, i])_a, scored against the r queries
  at::Tensor kn_scale;  // [2, H*r*n] float32 row scales of int8 kn; undefined otherwise
  at::Tensor kf_scale;  // [2, H*R*n] float32 row scales of int8 kf; undefined otherwise
  at::Tensor kf_wide;   // [2, H*R*n, Dk] float32: compact kf widened (q * scale, or the bf16 values), the
                        // numbers the products of more than the few rows used to widen on every call;
                        // undefined for fp32 keys. A speed copy: the scores are the same.
};

// Compact copies of prepared keys for inference: format "bf16" (half the bytes of float32) or "int8"
// (a quarter, plus one scale per row); "fp32" returns them unchanged. std::invalid_argument for another
// format or non-finite keys.
UltraMemDecodeKeys compact_keys(const UltraMemDecodeKeys& keys, const std::string& format);

// kn_row, kn_col: [H, n, r, Dk] normalised keys; u, v: [H, r] rank-1 filter vectors, or [H, R, r] the
// rank-R filter's. per_rank: fold for one query per rank (kf rows of r*Dk, not summed over a).
UltraMemDecodeKeys fold_filter_keys(const at::Tensor& kn_row, const at::Tensor& kn_col, const at::Tensor& u,
                                    const at::Tensor& v, bool per_rank = false);

struct UltraMemDecodeWeights {
  at::Tensor wq;            // [D, 2*Dk]        query projection ([D, 2*r*Dk] with query_per_rank)
  at::Tensor q_scale;       // [2, Dk]          query norm scales
  at::Tensor cores;         // [C, H, r, r]     Tucker cores
  UltraMemDecodeKeys keys;  // prepared keys (fold_filter_keys)
  at::Tensor values;        // [N, Dv]          float32/float64 (the compute dtype), bfloat16 or int8
  at::Tensor values_scale;  // [N] float32      per-row scale of int8 values; undefined otherwise
  at::Tensor perm;          // [E*N] int64      IVE permutation, entries in [0, E*N) (checked by the caller)
  at::Tensor wo;            // [E*Dv, D]        output projection ([Dv, D] with single_projection)
  at::Tensor wp;            // [D, Dp]          pre-value query projection (Dp > 0), compute dtype
  at::Tensor pre_values;    // [N, Dp]          pre-values (Dp > 0), compute dtype
  // A table in a file behind a row cache (tiered_values.h), in place of values / values_scale (then
  // undefined). The retrieval submits its rows' reads, the lookup waits for them; with the table's Feistel
  // key perm may be undefined too.
  std::shared_ptr<TieredValues> tiered;
};

// "" when perm is a contiguous int64 tensor [slots] with every entry in [0, slots), else what is wrong
// (e.g. "perm[12] = 99 is outside [0, 64)"). The callers check once per permutation, not per call:
// ultramem_decode trusts its perm.
std::string permutation_error(const at::Tensor& perm, int64_t slots);

// The IVE permutation of a layer's `slots` = n*n grid addresses into out[slots]: key == 0 shuffles
// [0, slots) with a 64-bit Mersenne Twister seeded from `seed` (the layer's seed); a nonzero key gives the
// keyed Feistel bijection (feistel_permutation). nn::UltraMem and the Python layer build theirs here.
void ive_permutation(int64_t slots, uint64_t seed, uint64_t key, int64_t* out);
// The same as a new int64 tensor [slots] (the registered op); std::invalid_argument for slots < 1.
at::Tensor ive_permutation_op(int64_t slots, int64_t seed, int64_t key);

// x: [T, D] contiguous float32 or float64 -> [T, D]. When given, *scores_out receives the kept
// candidates' per-core scores [T, H*m, C] and *index_out their grid addresses [T, H*m] (int64), as
// ops::tdqkr returns them (for telemetry; before any pre-value weight). With pre-values (Dp > 0) perm is
// needed even for a file-served table with a Feistel key: the pre-values' rows are read through it. A dtype, shape or layout mismatch is a c10::Error naming
// the argument, like the other ops'.
at::Tensor ultramem_decode(const at::Tensor& x, const UltraMemDecodeWeights& w, const UltraMemDims& d,
                           at::Tensor* scores_out = nullptr, at::Tensor* index_out = nullptr);

// The op in its two phases, for a memory whose output is added some blocks after its input is read
// (placement i:j): the retrieval at block i, the lookup at block j, and between them a prefetch of the
// value rows the lookup will read. ultramem_decode(x) = ultramem_lookup(ultramem_retrieve(x)).
struct UltraMemRetrieval {
  at::Tensor scores;  // [T, H*m, C] compute dtype: the kept candidates' per-core scores
  at::Tensor index;   // [T, H*m] int64: their grid addresses, in [0, E*N)
  at::Tensor pre;     // [T, H*m] compute dtype: the pre-value weight of each (Dp > 0), else undefined
};
UltraMemRetrieval ultramem_retrieve(const at::Tensor& x, const UltraMemDecodeWeights& w, const UltraMemDims& d);
// Prefetches (into the cache, nothing is computed) the value rows and row scales the lookup of `r` reads,
// in hit order, until max_bytes of rows were requested.
void ultramem_prefetch_values(const UltraMemRetrieval& r, const UltraMemDecodeWeights& w, const UltraMemDims& d,
                              int64_t max_bytes);
// -> [T, D]. Checks r against d (shapes, dtypes, index entries in [0, E*N)).
at::Tensor ultramem_lookup(const UltraMemRetrieval& r, const UltraMemDecodeWeights& w, const UltraMemDims& d);

// The same op with the weights as separate tensors, as registered for Python
// (torch.ops.ultramem.ultramem_decode): D, Dk, Dv, H, r, C, n and E are read from the shapes
// (cores [C, H, r, r], kn [2, H*r*n, Dk], values [N, Dv] with N = n*n/E, wq [D, 2*Dk], wo [E*Dv, D]); kf is
// [2, H*n, Dk], or [2, H*R*n, Dk] with filter_rank = R > 0. Compact keys: kn / kf in bfloat16, or int8
// with kn_scale [2, H*r*n] / kf_scale [2, H*R*n] float32 row scales. UltraMemV2's switches follow from the
// shapes too: wq [D, 2*r*Dk] (one query per rank; kf of width r*Dk, fold_filter_keys_op with per_rank),
// wo [Dv, D] (one projection), and wp [D, Dp] with pre_values [N, Dp] (pre-values).
at::Tensor ultramem_decode_op(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& q_scale,
                              const at::Tensor& cores, const at::Tensor& kn, const at::Tensor& kf,
                              const at::Tensor& values, const c10::optional<at::Tensor>& values_scale,
                              const at::Tensor& perm, const at::Tensor& wo, int64_t m, int64_t m_first,
                              int64_t m_neg, bool rms_norm, const c10::optional<at::Tensor>& kn_scale,
                              const c10::optional<at::Tensor>& kf_scale, int64_t filter_rank = 0,
                              const c10::optional<at::Tensor>& wp = {},
                              const c10::optional<at::Tensor>& pre_values = {});
// The same returning also the kept candidates' per-core scores [T, H*m, C] and grid addresses [T, H*m]
// (for the telemetry of a Python layer).
std::tuple<at::Tensor, at::Tensor, at::Tensor> ultramem_decode_retrieval_op(
    const at::Tensor& x, const at::Tensor& wq, const at::Tensor& q_scale, const at::Tensor& cores,
    const at::Tensor& kn, const at::Tensor& kf, const at::Tensor& values, const c10::optional<at::Tensor>& values_scale,
    const at::Tensor& perm, const at::Tensor& wo, int64_t m, int64_t m_first, int64_t m_neg, bool rms_norm,
    const c10::optional<at::Tensor>& kn_scale, const c10::optional<at::Tensor>& kf_scale, int64_t filter_rank = 0,
    const c10::optional<at::Tensor>& wp = {}, const c10::optional<at::Tensor>& pre_values = {});
std::tuple<at::Tensor, at::Tensor> fold_filter_keys_op(const at::Tensor& kn_row, const at::Tensor& kn_col,
                                                       const at::Tensor& u, const at::Tensor& v, bool per_rank = false);

}  // namespace ultramem::ops
