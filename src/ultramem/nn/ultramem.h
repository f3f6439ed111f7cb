// The UltraMem memory layer (spec sections 3-6): shared query, normalised keys, TDQKR retrieval,
// implicit value expansion with multi-core scoring, one output projection.
#pragma once
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <cmath>
#include <memory>
#include <utility>
#include <vector>

#include "ultramem/nn/memory_config.h"
#include "ultramem/nn/value_lookup.h"

namespace ultramem::ops {
class TieredValues;
}

namespace ultramem::nn {

// Memory telemetry over the current window (spec section 6).
struct MemoryStats {
  double coverage = 0;        // fraction of the n*n virtual slots hit in the window
  double kl_uniform = 0;      // KL(hit distribution || uniform over the n*n slots), nats
  double top1_score = 0;      // mean over tokens and heads of the best kept score (sum over cores)
  double topm_score = 0;      // mean of all kept scores (sum over cores)
  double output_std = 0;      // std of the layer output, last forward
  double core_l1 = 0;         // largest singular value of the core sum, mean over heads
  double core_l2 = 0;         // second singular value (0 when r == 1), mean over heads
  int64_t tokens = 0;         // tokens seen in the window
  // Retrieval quality on the window's first retrieval_sample tokens, against the exact top-m over the
  // whole grid (ops::tdqkr_exact); NaN when no token was checked.
  double recall = std::nan("");      // share of the exact top-m (per token and head) that TDQKR kept
  double score_mass = std::nan("");  // summed scores of the kept / of the exact top-m
  int64_t retrieval_tokens = 0;      // tokens checked
  double key_agreement = std::nan("");  // compact keys (set_key_format): share of the kept candidates
                                        // that the float keys keep too; NaN with float keys
  // Running sums of the window (not reported).
  int64_t retrieval_found = 0, retrieval_slots = 0, key_same = 0;
  double mass_kept = 0, mass_exact = 0;
};

class UltraMemImpl : public torch::nn::Module {
 public:
  explicit UltraMemImpl(UltraMemConfig cfg);

  // x: [..., D] -> [..., D]
  torch::Tensor forward(const torch::Tensor& x);

  // Tucker aux loss: alpha/(r-1) * sum_{i>=2} max(0, l_i - tau)^2 over the singular values of each
  // head's core sum, the mean over heads (aux_reduction sum: the sum). A zero scalar when disabled or
  // r == 1. Depends on the cores only.
  torch::Tensor aux_loss() const;

  // Recomputes the rank-1 filter (u, v) from the SVD of the core sum, with the sign-continuity rule.
  // Call once per optimizer step.
  void refresh_tucker_approx();

  MemoryStats stats() const;
  void reset_stats();

  // Keeps the permutation buffer int64 when the floating dtype changes.
  void to(torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Device device, torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Device device, bool non_blocking = false) override;

  const UltraMemConfig& config() const { return cfg_; }

  // Switches TDQKR's first-stage filter (config fields filter, m_neg and filter_rank; m_first may change
  // with it, 0 keeps it), e.g. to evaluate a model with another filter than it was trained with.
  // Validates like the config (std::invalid_argument naming the field; the layer is unchanged then).
  void set_filter(RetrievalFilter filter, int64_t m_neg, int64_t m_first = 0, int64_t filter_rank = 0);

  // The first-stage filter's vectors (no grad): u_vec, v_vec [H, r] for rank1 / two_sign; for rank_r
  // [H, R, r], the R leading singular pairs of each head's core sum, each scaled by sqrt(sigma_k),
  // computed from the cores (so they are never stale and need no buffer).
  std::pair<torch::Tensor, torch::Tensor> filter_vectors() const;

  // Replaces the local pooled lookup (ops::pooled_lookup over `values`) by `lookup`, e.g.
  // dist::ShardedValueLookup, for which `values` holds only this process's column slice [N, Dv/W].
  // With a lookup installed every forward, no-grad ones included, goes through it. nullptr: local op.
  void set_value_lookup(std::shared_ptr<ValueLookup> lookup) { value_lookup_ = std::move(lookup); }
  const std::shared_ptr<ValueLookup>& value_lookup() const { return value_lookup_; }

  // ---- Inference (ultramem_values.cpp) -----------------------------------------------------
  // With grad mode off (torch::NoGradGuard or torch::InferenceMode) forward() takes a fast path: no
  // autograd graph, the normalised keys cached (recomputed when keys or k_scale change, see
  // invalidate_inference_cache), the kernels called on raw buffers, telemetry only with
  // config().track_stats. It gives the same result as the autograd path up to float rounding.

  // Stores the value table as `f`: float32 (trainable), bf16 or int8 with a per-row scale (inference
  // only: a grad-enabled forward then throws std::logic_error). Quantising starts from float32 values;
  // bf16 -> float32 is exact and allowed; converting int8 back, or bf16 to int8, throws
  // std::logic_error (reload the float32 weights instead). A converted table sits on transparent huge
  // pages. Same format: no-op. Throws std::invalid_argument for non-finite values (int8).
  void set_value_format(ValueFormat f);
  ValueFormat value_format() const { return format_; }

  // Storage of the keys the no-grad fast path scores against (its cache of normalised, folded keys):
  // fp32 (the compute dtype), bf16 or int8 with one scale per key row; scores accumulate in the compute
  // dtype. Training and grad-enabled forwards always use the float keys; the parameters are unchanged.
  // With retrieval_sample > 0 the telemetry reports key_agreement, the share of the kept candidates
  // the float keys would have kept too.
  void set_key_format(ValueFormat f);
  ValueFormat key_format() const { return key_format_; }
  // Bytes of the stored value table, per-row scales included.
  int64_t value_bytes() const;

  // Installs a value table as stored (checkpoint loading, memory mapping): values [N, Dv] float32,
  // bfloat16 or int8; scale [N] float32 for int8, undefined otherwise. The tensors are used as they
  // are (no copy). read_only: the memory must never be written (a read-only file mapping); such a
  // layer refuses grad-enabled forwards. Throws std::invalid_argument for wrong shapes or dtypes and
  // std::logic_error where set_value_format would (an int8 table cannot be replaced by another format).
  void set_value_table(torch::Tensor values, torch::Tensor scale, bool read_only);
  bool values_read_only() const { return values_read_only_; }
  // Installs a stored IVE permutation as it is (no copy), e.g. a read-only mapping of a checkpoint's: int64
  // [n*n], contiguous, on the CPU; std::invalid_argument otherwise. The entries are checked at the next
  // forward that reads them (a layer served from a table file with a Feistel key never does).
  void set_permutation_table(torch::Tensor perm);

  // Serves the value table from a file behind a bounded row cache (ops/tiered_values.h) in place of
  // `values`, for tables larger than memory: no-grad forwards only (a grad-enabled one throws
  // std::logic_error); the retrieval starts the rows' reads, the lookup waits for them. Checked here
  // (std::invalid_argument naming the file): the file holds N rows of Dv values for this layer's E; a
  // Feistel key matches the layer's permutation_key, or materialises its stored permutation; a layer
  // without its table in memory (external_values) gets a key. Null: back to `values`.
  void set_tiered_values(std::shared_ptr<ops::TieredValues> tiered);
  const std::shared_ptr<ops::TieredValues>& tiered_values() const { return tiered_; }

  // The no-grad forward in two phases, for a memory whose output is added some blocks after its input
  // is read (placement i:j with i < j): retrieve() at block i (query, TDQKR), lookup() at block j
  // (pooled lookup, output projection). With prefetch_bytes > 0 retrieve() also prefetches up to that
  // many bytes of the value rows the lookup will read, so that the blocks in between hide their memory
  // latency. lookup(retrieve(x, b)) equals forward(x) bit for bit. Needs grad mode off and the local
  // table (two_phase_applies()); otherwise std::logic_error.
  struct PendingLookup {
    torch::Tensor scores;       // [T, H*m, C] kept candidates' per-core scores
    torch::Tensor index;        // [T, H*m] int64 their grid addresses
    torch::Tensor pre;          // [T, H*m] their pre-value weights (UltraMemV2), else undefined
    torch::Tensor u;            // [T, D] the input, kept for the telemetry (track_stats) only
    std::vector<int64_t> lead;  // the output's shape: x's leading dims, then D
  };
  bool two_phase_applies() const;
  PendingLookup retrieve(const torch::Tensor& x, int64_t prefetch_bytes);
  torch::Tensor lookup(const PendingLookup& pending);

  // Drops the cached normalised keys; the next no-grad forward recomputes them. The cache is also
  // dropped by train()/eval() and by refresh_tucker_approx() (once per optimizer step), which covers
  // optimizers that write parameters through raw pointers (no version bump); call this after any
  // other such write to keys or k_scale.
  void invalidate_inference_cache();
  void train(bool on = true) override;

  // Parameters (registered under these names).
  torch::Tensor wq;       // [D, 2*Dk]           query projection (shared by all heads); [D, 2*r*Dk] with
                          //                     query_per_rank (side, then rank, then Dk)
  torch::Tensor q_scale;  // [2, Dk]             query norm scales (row half, col half)
  torch::Tensor keys;     // [H, 2, n, Dk, r]    un-normalised keys
  torch::Tensor k_scale;  // [2, Dk]             key norm scales (row keys, col keys)
  torch::Tensor cores;    // [C, H, r, r]        Tucker cores
  torch::Tensor values;   // [N, Dv]             physical value table (float32, or bf16 / int8, see value_format())
  torch::Tensor wo;       // [E*Dv, D]           output projection (one [Dv, D] block per IVE group);
                          //                     [Dv, D] with single_projection
  torch::Tensor wp;       // [D, Dp]             pre-value query (Dp > 0, else undefined)
  torch::Tensor pre_values;  // [N, Dp]          pre-values (Dp > 0, else undefined)
  // Buffers.
  torch::Tensor perm;     // [E*N] int64         IVE permutation of the grid addresses
  torch::Tensor u_vec;    // [H, r]              rank-1 filter, row side
  torch::Tensor v_vec;    // [H, r]              rank-1 filter, col side
  torch::Tensor values_scale;  // [N] float32      per-row scale of int8 values; registered (buffer
                               //                  "values_scale") once the table is int8, else undefined

 private:
  torch::Tensor norm(const torch::Tensor& x, const torch::Tensor& scale) const;  // over last dim
  // u: [T, D] layer input; scores [T, H*m, C], index [T, H*m] kept; out [T, D].
  void record_stats(const torch::Tensor& u, const torch::Tensor& scores, const torch::Tensor& index,
                    const torch::Tensor& out);
  // Retrieval quality of the first tokens of u (up to the window's retrieval_sample) into window_.
  void measure_retrieval(const torch::Tensor& u, const torch::Tensor& scores, const torch::Tensor& index);
  // u: [T, D], scores [T, H*m, C], index [T, H*m] -> the pre-value weights [T, H*m]: <u wp, pre_values[row]>.
  torch::Tensor pre_value_weights(const torch::Tensor& u, const torch::Tensor& index) const;
  // u: [T, D] -> (S_row, S_col), each [T, H, r, n]: query halves against the normalised keys.
  std::pair<torch::Tensor, torch::Tensor> key_scores(const torch::Tensor& u) const;
  // The no-grad fast path (ops::ultramem_decode); u: [T, D] contiguous -> [T, D].
  torch::Tensor forward_inference(const torch::Tensor& u);
  // The fused op's weights and dims for compute dtype st (normalised keys from the cache, rebuilt when
  // stale); throws std::invalid_argument for an input dtype the layer cannot compute in.
  struct DecodeArgs;
  DecodeArgs decode_args(torch::ScalarType st);
  // Throws std::logic_error when the value table cannot be trained (format, read-only memory).
  void check_trainable() const;
  // Runs `convert` (a Module::to) keeping a bf16 / int8 value table and its scales as they are.
  template <typename Fn>
  void keep_stored_values(Fn&& convert);

  struct InferenceCache;                 // normalised keys (ultramem_values.cpp)
  static std::shared_ptr<InferenceCache> make_inference_cache();
  std::shared_ptr<InferenceCache> infer_;
  ValueFormat format_ = ValueFormat::kFloat32;
  ValueFormat key_format_ = ValueFormat::kFloat32;
  bool values_read_only_ = false;

  std::shared_ptr<ValueLookup> value_lookup_;  // replaces ops::pooled_lookup when set
  std::shared_ptr<ops::TieredValues> tiered_;  // replaces `values` in no-grad forwards when set
  UltraMemConfig cfg_;
  std::vector<int32_t> hits_;   // [n*n] hit counts of the current window
  MemoryStats window_;          // running sums of the current window
  MemoryStats last_;            // the last completed window
  double core_l1_ = 0, core_l2_ = 0;
};
TORCH_MODULE(UltraMem);

}  // namespace ultramem::nn
