// Decoder-only transformer language model: token embedding, pre-RMSNorm blocks with causal RoPE
// attention and a dense / MoE / no FFN, memory layers placed across blocks (skip-layer), final norm
// and LM head (optionally tied). The trainer talks to it only through this interface.
#pragma once
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <map>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "ultramem/nn/engram.h"
#include "ultramem/nn/model_config.h"

namespace ultramem::nn {

// Per-layer key/value cache for incremental decoding.
struct KVCache {
  std::vector<torch::Tensor> k;  // per block [B, n_heads, max_len, head_dim]
  std::vector<torch::Tensor> v;  // per block [B, n_heads, max_len, head_dim]
  int64_t length = 0;            // positions filled
  std::vector<EngramState> engram;  // per Engram memory: its last tokens and convolution inputs
};

// Parameters split by how the optimizer treats them.
struct ParamGroups {
  std::vector<torch::Tensor> decay;          // matrices: weight decay applies
  std::vector<torch::Tensor> no_decay;       // norms' scales, biases, memory keys' norm scales, cores
  std::vector<torch::Tensor> memory_values;  // memory value tables: own lr multiplier, row-sparse updates
  std::vector<torch::Tensor> experts;        // MoE expert matrices (w_in, w_out): weight decay, own lr multiplier
};

class TransformerImpl : public torch::nn::Module {
 public:
  explicit TransformerImpl(ModelConfig cfg);

  // tokens: [B, T] int64 in [0, vocab) -> logits [B, T, vocab]. Also computes this forward's
  // auxiliary losses (see aux_losses()).
  torch::Tensor forward(const torch::Tensor& tokens);

  // Incremental decoding: tokens [B, t] continue the sequences in `cache`; returns logits of the
  // new positions [B, t, vocab], or with last_only of the last one [B, 1, vocab] (a prefill that samples
  // from its last position skips the LM head of the others). No autograd state is kept (call under
  // NoGradGuard/InferenceMode).
  torch::Tensor forward_cached(const torch::Tensor& tokens, KVCache& cache, bool last_only = false);
  KVCache make_cache(int64_t batch, int64_t max_len) const;

  // Continuous batching: one decode step of B sequences that each own a row ("slot") of `cache` (made
  // with make_cache(S, L), S slots) and have their own length. tokens [B] int64; sequence b feeds
  // tokens[b] at position positions[b] (< L: the tokens it already has in its slot) of slot slots[b]
  // (distinct, < S). Returns logits [B, vocab]. cache.length is not used. No autograd state is kept.
  // A row's logits are the bits it would get alone when ultramem::batch_invariant() is on (ops/runtime.h).
  torch::Tensor decode_slots(const torch::Tensor& tokens, KVCache& cache, const std::vector<int64_t>& slots,
                             const std::vector<int64_t>& positions);
  // Row `slot` of `cache` as a batch-1 cache of `length` filled positions sharing its storage: prefill
  // one sequence into its slot with forward_cached.
  static KVCache slot_view(KVCache& cache, int64_t slot, int64_t length = 0);

  // The residual stream of a forward pass: [n_layers + 1] tensors [B, T, D], the embeddings and the
  // stream after each block (memory outputs written after a block included). For tests and analysis;
  // does not touch aux_losses().
  std::vector<torch::Tensor> residual_stream(const torch::Tensor& tokens);

  // Named auxiliary losses of the last forward, coefficients applied (e.g. "moe_balance",
  // "tucker"); their sum is added to the LM loss by the trainer.
  std::map<std::string, torch::Tensor> aux_losses() const;  // scalars; empty before any forward

  // Called by the trainer once after every optimizer step (refreshes the TDQKR rank-1 filters).
  void after_optimizer_step();

  // decay: embeddings, LM head, attention, FFN, expert and router matrices, memory wq / wo / keys;
  // no_decay: RMSNorm scales, memory q/k norm scales and Tucker cores, PKM query-norm parameters;
  // memory_values: every memory layer's `values` (and UltraMemV2's `pre_values`). Each parameter is in exactly one group.
  ParamGroups param_groups();

  // Telemetry of the memory layers and MoE routing since the last call, as JSON (flat keys such as
  // "mem0.coverage", "moe.load_max"); resets the windows it reports.
  nlohmann::json telemetry();

  const ModelConfig& config() const { return cfg_; }

  // Inference storage of the dense matrices (attention, dense FFN, MoE experts, the LM head and the
  // embedding tied to it): kBFloat16 or kInt8 (one scale per output row) compact copies that the no-grad
  // decode ops read, the parameters rounded in place to the same values (nn/compact_weight.h); kFloat32
  // drops the copies (the parameters keep their rounding). The memory layers and norms are unchanged.
  // With int8 the no-grad products of up to 16 rows also round their inputs to int8 per block of 32
  // (ops::Matrix).
  void set_weight_format(ValueFormat f);
  ValueFormat weight_format() const;
  int64_t compact_weight_bytes() const;  // the compact copies' bytes (0 for kFloat32)

  // Prefetch in the skip window: in a no-grad forward an UltraMem layer placed i:j with i < j (local
  // value table) runs its retrieval at block i, prefetches up to `bytes` of the value rows it will read,
  // and runs its lookup at block j (UltraMemImpl::retrieve / lookup); the result is the same bit for
  // bit. 0 turns it off: the memory then runs whole at block i. Throws std::invalid_argument for < 0.
  // Off by default: with the tables in RAM it measured 0.96-1.03x of off on this project's CPU (the
  // lookup is 1-6% of a step; docs/performance.md, D.15); it is there for tables whose rows come from
  // slower storage. Engram memories use the same setting: with a KV cache, a no-grad step requests up to
  // `bytes` of each Engram table's rows for the step's tokens before block 0 runs (EngramImpl::prefetch_rows).
  static constexpr int64_t kDefaultValuePrefetchBytes = 0;
  void set_value_prefetch(int64_t bytes);
  int64_t value_prefetch() const;

  // Reads issued a block ahead: a memory placed i:j with i < j whose table is a file
  // (UltraMemImpl::set_tiered_values) starts the reads of its rows at block i and waits for them at block
  // j, whatever set_value_prefetch says (on by default). Off: it runs whole at block i, waiting for its
  // reads at once (for comparisons). The result is the same bit for bit.
  void set_tiered_reads_ahead(bool on);
  bool tiered_reads_ahead() const;

 private:
  ModelConfig cfg_;
  // Implementation members are defined by transformer.cpp (blocks, embeddings, memories, ...).
  struct Impl;
  std::shared_ptr<Impl> impl_;
};
TORCH_MODULE(Transformer);

}  // namespace ultramem::nn
