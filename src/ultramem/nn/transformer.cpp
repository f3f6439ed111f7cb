#include "ultramem/nn/transformer.h"

#include <torch/torch.h>

#include <array>
#include <cmath>
#include <stdexcept>
#include <string>

#include <nlohmann/json.hpp>

#include "ultramem/nn/attention.h"
#include "ultramem/nn/moe.h"
#include "ultramem/nn/pkm.h"
#include "ultramem/nn/rmsnorm.h"
#include "ultramem/nn/swiglu.h"
#include "ultramem/nn/ultramem.h"
#include "ultramem/ops/block_decode.h"

namespace ultramem::nn {
namespace {

// One pre-norm block: attention (with its norm) and the FFN (with its norm). The FFN norm exists
// when the block has an FFN or a memory layer reads its output.
class BlockImpl : public torch::nn::Module {
 public:
  BlockImpl(const ModelConfig& c, int64_t b, bool memory_reads_here, at::Generator gen) : kind(c.ffn_kind(b)) {
    // Output projections of attention and FFN use the depth-scaled std (GPT-2 style).
    const double out_std = c.init_std / std::sqrt(2.0 * double(c.n_layers));
    attn_norm = register_module("attn_norm", RMSNorm(c.d_model, c.norm_eps));
    AttentionOptions ao;
    ao.d_model = c.d_model;
    ao.n_heads = c.n_heads;
    ao.max_seq_len = c.max_seq_len;
    ao.rope_theta = c.rope_theta;
    ao.dropout = c.dropout;
    ao.init_std = c.init_std;
    ao.out_std = out_std;
    attn = register_module("attn", CausalSelfAttention(ao, gen));
    if (kind != FfnKind::None || memory_reads_here)
      ffn_norm = register_module("ffn_norm", RMSNorm(c.d_model, c.norm_eps));
    if (kind == FfnKind::Dense)
      dense = register_module("ffn", SwiGLU(c.d_model, c.ffn_hidden, gen, c.init_std, out_std));
    else if (kind == FfnKind::MoE)
      moe = register_module("moe", MoE(c.d_model, c.moe, c.moe_expert_hidden(), gen, c.init_std, out_std));
  }

  FfnKind kind;
  RMSNorm attn_norm{nullptr};
  CausalSelfAttention attn{nullptr};
  RMSNorm ffn_norm{nullptr};  // null when nothing reads the FFN input
  SwiGLU dense{nullptr};
  MoE moe{nullptr};
};
TORCH_MODULE(Block);

// Checks tokens [B, T]: int64, 2-D, non-empty, T <= max_t, ids in [0, vocab). Throws
// std::invalid_argument naming the problem (and the first bad id with its position).
void check_tokens(const torch::Tensor& tokens, int64_t vocab, int64_t max_t, const std::string& who,
                  const std::string& limit_name) {
  if (!tokens.defined()) throw std::invalid_argument(who + ": tokens tensor is undefined");
  if (tokens.scalar_type() != torch::kLong)
    throw std::invalid_argument(who + ": tokens must be int64, got " + std::string(c10::toString(tokens.scalar_type())));
  if (tokens.dim() != 2)
    throw std::invalid_argument(who + ": tokens must have shape [B, T], got " + std::to_string(tokens.dim()) +
                                " dimensions");
  const int64_t B = tokens.size(0), T = tokens.size(1);
  if (B < 1 || T < 1)
    throw std::invalid_argument(who + ": tokens must be non-empty, got [" + std::to_string(B) + ", " +
                                std::to_string(T) + "]");
  if (T > max_t)
    throw std::invalid_argument(who + ": " + std::to_string(T) + " tokens per sequence exceed " + limit_name +
                                " = " + std::to_string(max_t));
  const auto bad = (tokens < 0).logical_or(tokens >= vocab);
  if (bad.any().item<bool>()) {
    const auto where = bad.nonzero()[0];  // [2]: first offending (b, t)
    const int64_t b = where[0].item<int64_t>(), t = where[1].item<int64_t>();
    throw std::invalid_argument(who + ": token id " + std::to_string(tokens[b][t].item<int64_t>()) + " at [" +
                                std::to_string(b) + ", " + std::to_string(t) + "] is outside [0, vocab_size = " +
                                std::to_string(vocab) + ")");
  }
}

}  // namespace

struct TransformerImpl::Impl {
  torch::Tensor embedding;            // [V, D]
  torch::Tensor lm_head;              // [V, D], untied models only
  std::vector<Block> blocks;          // [n_layers]
  RMSNorm final_norm{nullptr};
  std::vector<UltraMem> ultramem;     // [memories] (UltraMem models)
  std::vector<PKM> pkm;               // [memories] (PKM models)
  std::vector<Engram> engram;         // [memories] (Engram models)
  std::vector<std::vector<int64_t>> reads_at, writes_at;  // [n_layers] -> memory ids reading / writing there
  std::map<std::string, torch::Tensor> aux;
  std::vector<std::array<double, 3>> pkm_out;  // [memories] sum, sum of squares, count of PKM outputs
  CompactWeight head_c;                // [V, D] compact rows of the LM head (or the tied embedding), when set
  int64_t prefetch_bytes = TransformerImpl::kDefaultValuePrefetchBytes;  // set_value_prefetch
  bool tiered_ahead = true;                                                // set_tiered_reads_ahead

  // u: [B, T, D] -> [B, T, D]; tokens [B, T] and the decoding state for Engram memories (or nullptr).
  torch::Tensor memory_forward(int64_t k, const torch::Tensor& u, const torch::Tensor& tokens, EngramState* state) {
    if (!ultramem.empty()) return ultramem[k]->forward(u);
    if (!engram.empty()) return engram[k]->forward(u, tokens, state);
    auto out = pkm[k]->forward(u);
    torch::NoGradGuard ng;
    const auto o = out.detach().to(torch::kDouble);
    pkm_out[k][0] += o.sum().item<double>();
    pkm_out[k][1] += o.pow(2).sum().item<double>();
    pkm_out[k][2] += double(o.numel());
    return out;
  }

  // tokens [B, T] at positions [pos0, pos0 + T) -> logits [B, T, V]. With `cache` the attention
  // reads and extends it; with `residuals` the stream after the embedding and every block is kept.
  // slots / positions (with a cache, one token per sequence): each sequence's cache row and position
  // (decode_slots); otherwise every sequence is cache row b and starts at pos0.
  torch::Tensor run(const ModelConfig& c, bool training, const torch::Tensor& tokens, int64_t pos0, KVCache* cache,
                    std::vector<torch::Tensor>* residuals, bool record_aux,
                    const std::vector<int64_t>* slots = nullptr, const std::vector<int64_t>* positions = nullptr,
                    bool last_only = false) {
    const double p = training ? c.dropout : 0.0;
    auto branch = [&](const torch::Tensor& x) { return p > 0 ? torch::dropout(x, p, true) : x; };
    // Engram states: the cache's, or with slots the rows of the B slots, gathered here and written back
    // after the blocks.
    std::vector<EngramState> slot_states;
    torch::Tensor slot_index;  // [B] int64
    if (cache && slots && !engram.empty()) {
      slot_index = torch::tensor(*slots, torch::kLong);
      for (const auto& s : cache->engram)
        slot_states.push_back({s.tokens.index_select(0, slot_index), s.conv_input.index_select(0, slot_index)});
    }
    auto engram_state = [&](size_t k) -> EngramState* {
      return !cache ? nullptr : slots ? &slot_states[k] : &cache->engram[k];
    };
    // Engram's rows follow from the token ids: their reads start before the blocks below the memory run.
    if (cache && prefetch_bytes > 0 && !at::GradMode::is_enabled())
      for (size_t k = 0; k < engram.size(); ++k) engram[k]->prefetch_rows(tokens, *engram_state(k), prefetch_bytes);
    torch::Tensor h = torch::embedding(embedding, tokens);  // [B, T, D]
    if (residuals) residuals->push_back(h);
    std::vector<torch::Tensor> mem_out(ultramem.size() + pkm.size() + engram.size());  // pending memory outputs
    // Memories split around their skip window (set_value_prefetch, or a table file's reads issued ahead):
    // retrieval at the read block, lookup at the write block.
    // (Indexed like mem_out: every memory has an entry, a PKM's stays unsplit.)
    std::vector<UltraMemImpl::PendingLookup> pending(mem_out.size());
    std::vector<char> split(mem_out.size(), 0);
    for (size_t k = 0; k < ultramem.size(); ++k) {
      const auto& pl = c.memory_placement[k];
      const bool overlap = prefetch_bytes > 0 || (tiered_ahead && ultramem[k]->tiered_values());
      split[k] = overlap && pl.write_block > pl.read_block && ultramem[k]->two_phase_applies();
    }
    torch::Tensor balance;
    for (size_t b = 0; b < blocks.size(); ++b) {
      auto& blk = blocks[b];
      const auto a = !cache  ? blk->attn->forward(blk->attn_norm->forward(h))
                     : slots ? blk->attn->forward_slots(blk->attn_norm->forward(h), *slots, *positions, cache->k[b],
                                                        cache->v[b])
                             : blk->attn->forward(blk->attn_norm->forward(h), pos0, &cache->k[b], &cache->v[b]);
      h = h + branch(a);
      if (blk->ffn_norm) {
        const auto u = blk->ffn_norm->forward(h);  // [B, T, D], the FFN input memories read
        for (int64_t k : reads_at[b]) {
          if (split[k])
            pending[k] = ultramem[k]->retrieve(u, prefetch_bytes);
          else
            mem_out[k] = memory_forward(k, u, tokens, engram.empty() ? nullptr : engram_state(size_t(k)));
        }
        if (blk->dense) {
          h = h + branch(blk->dense->forward(u));
        } else if (blk->moe) {
          h = h + branch(blk->moe->forward(u));
          if (record_aux) balance = balance.defined() ? balance + blk->moe->balance_loss() : blk->moe->balance_loss();
        }
      }
      for (int64_t k : writes_at[b]) {
        if (split[k]) {
          mem_out[k] = ultramem[k]->lookup(pending[k]);
          pending[k] = UltraMemImpl::PendingLookup();
        }
        h = h + branch(mem_out[k]);
        mem_out[k] = torch::Tensor();
      }
      if (residuals) residuals->push_back(h);
    }
    for (size_t k = 0; k < slot_states.size(); ++k) {
      cache->engram[k].tokens.index_copy_(0, slot_index, slot_states[k].tokens);
      cache->engram[k].conv_input.index_copy_(0, slot_index, slot_states[k].conv_input);
    }
    if (last_only) h = h.narrow(1, h.size(1) - 1, 1);  // [B, 1, D]
    h = final_norm->forward(h);
    const auto& head = lm_head.defined() ? lm_head : embedding;  // [V, D]
    torch::Tensor logits;                                          // [B, T, V]
    if (ops::no_grad_op_applies(h, head)) {
      logits = ops::linear_nt(h.reshape({-1, h.size(-1)}), head_c.get(head)).view({h.size(0), h.size(1), head.size(0)});
    } else {
      logits = h.matmul(head.t());
    }
    if (record_aux) {
      aux.clear();
      if (balance.defined()) aux["moe_balance"] = balance;
      torch::Tensor tucker;
      for (auto& m : ultramem)
        if (m->config().aux_loss && m->config().r >= 2)
          tucker = tucker.defined() ? tucker + m->aux_loss() : m->aux_loss();
      if (tucker.defined()) aux["tucker"] = tucker;
    }
    return logits;
  }
};

TransformerImpl::TransformerImpl(ModelConfig cfg) : cfg_(std::move(cfg)), impl_(std::make_shared<Impl>()) {
  cfg_.validate();
  const auto& c = cfg_;
  auto& m = *impl_;
  at::Generator gen = at::detail::createCPUGenerator(c.seed);
  m.embedding = register_parameter("embedding", at::normal(0.0, c.init_std, {c.vocab_size, c.d_model}, gen));

  m.reads_at.assign(c.n_layers, {});
  m.writes_at.assign(c.n_layers, {});
  for (size_t k = 0; k < c.memory_placement.size(); ++k) {
    m.reads_at[c.memory_placement[k].read_block - 1].push_back(int64_t(k));
    m.writes_at[c.memory_placement[k].write_block - 1].push_back(int64_t(k));
  }
  torch::nn::ModuleList blocks;
  for (int64_t b = 0; b < c.n_layers; ++b) {
    m.blocks.push_back(Block(c, b, !m.reads_at[b].empty(), gen));
    blocks->push_back(m.blocks.back());
  }
  register_module("blocks", blocks);
  m.final_norm = register_module("final_norm", RMSNorm(c.d_model, c.norm_eps));
  if (!c.tie_embeddings)
    m.lm_head = register_parameter("lm_head", at::normal(0.0, c.init_std, {c.vocab_size, c.d_model}, gen));

  if (c.has_memory()) {
    torch::nn::ModuleList memories;
    for (size_t k = 0; k < c.memory_placement.size(); ++k) {
      if (is_ultramem(c.memory_kind)) {
        m.ultramem.push_back(UltraMem(c.ultramem_layer_config(int64_t(k))));
        memories->push_back(m.ultramem.back());
      } else if (c.memory_kind == MemoryKind::Engram) {
        m.engram.push_back(Engram(c.engram_layer_config(int64_t(k))));
        memories->push_back(m.engram.back());
      } else {
        m.pkm.push_back(PKM(c.pkm_layer_config(int64_t(k))));
        memories->push_back(m.pkm.back());
      }
    }
    m.pkm_out.assign(m.pkm.size(), {0.0, 0.0, 0.0});
    register_module("memories", memories);
  }
}

torch::Tensor TransformerImpl::forward(const torch::Tensor& tokens) {
  check_tokens(tokens, cfg_.vocab_size, cfg_.max_seq_len, "Transformer::forward", "max_seq_len");
  return impl_->run(cfg_, is_training(), tokens, 0, nullptr, nullptr, /*record_aux=*/true);
}

std::vector<torch::Tensor> TransformerImpl::residual_stream(const torch::Tensor& tokens) {
  check_tokens(tokens, cfg_.vocab_size, cfg_.max_seq_len, "Transformer::residual_stream", "max_seq_len");
  std::vector<torch::Tensor> out;
  impl_->run(cfg_, is_training(), tokens, 0, nullptr, &out, /*record_aux=*/false);
  return out;
}

KVCache TransformerImpl::make_cache(int64_t batch, int64_t max_len) const {
  if (batch < 1) throw std::invalid_argument("Transformer::make_cache: batch must be >= 1, got " + std::to_string(batch));
  if (max_len < 1 || max_len > cfg_.max_seq_len)
    throw std::invalid_argument("Transformer::make_cache: max_len must be in [1, max_seq_len = " +
                                std::to_string(cfg_.max_seq_len) + "], got " + std::to_string(max_len));
  const int64_t hd = cfg_.d_model / cfg_.n_heads;
  KVCache cache;
  const auto opts = impl_->embedding.options().requires_grad(false);
  for (int64_t b = 0; b < cfg_.n_layers; ++b) {
    cache.k.push_back(torch::zeros({batch, cfg_.n_heads, max_len, hd}, opts));
    cache.v.push_back(torch::zeros({batch, cfg_.n_heads, max_len, hd}, opts));
  }
  for (const auto& e : impl_->engram) cache.engram.push_back(e->make_state(batch));
  return cache;
}

torch::Tensor TransformerImpl::forward_cached(const torch::Tensor& tokens, KVCache& cache, bool last_only) {
  const std::string who = "Transformer::forward_cached";
  if (int64_t(cache.k.size()) != cfg_.n_layers || int64_t(cache.v.size()) != cfg_.n_layers)
    throw std::invalid_argument(who + ": cache has " + std::to_string(cache.k.size()) + " layers, the model " +
                                std::to_string(cfg_.n_layers) + " (use make_cache)");
  const int64_t capacity = std::min<int64_t>(cache.k[0].size(2), cfg_.max_seq_len);
  if (cache.length < 0 || cache.length >= capacity)
    throw std::invalid_argument(who + ": cache is full (length " + std::to_string(cache.length) + " of " +
                                std::to_string(capacity) + " positions; max_seq_len " +
                                std::to_string(cfg_.max_seq_len) + ")");
  check_tokens(tokens, cfg_.vocab_size, capacity - cache.length, who,
               "the positions left in the cache (max_len or max_seq_len minus length " +
                   std::to_string(cache.length) + ")");
  if (tokens.size(0) != cache.k[0].size(0))
    throw std::invalid_argument(who + ": batch " + std::to_string(tokens.size(0)) + " differs from the cache's " +
                                std::to_string(cache.k[0].size(0)));
  if (cache.engram.size() != impl_->engram.size())
    throw std::invalid_argument(who + ": the cache holds " + std::to_string(cache.engram.size()) +
                                " Engram states, the model has " + std::to_string(impl_->engram.size()) +
                                " Engram memories (use make_cache)");
  torch::NoGradGuard no_grad;
  auto logits = impl_->run(cfg_, is_training(), tokens, cache.length, &cache, nullptr, /*record_aux=*/false, nullptr,
                           nullptr, last_only);
  cache.length += tokens.size(1);
  return logits;
}

torch::Tensor TransformerImpl::decode_slots(const torch::Tensor& tokens, KVCache& cache, const std::vector<int64_t>& slots,
                                            const std::vector<int64_t>& positions) {
  const std::string who = "Transformer::decode_slots";
  if (int64_t(cache.k.size()) != cfg_.n_layers || int64_t(cache.v.size()) != cfg_.n_layers)
    throw std::invalid_argument(who + ": cache has " + std::to_string(cache.k.size()) + " layers, the model " +
                                std::to_string(cfg_.n_layers) + " (use make_cache)");
  if (!tokens.defined() || tokens.dim() != 1)
    throw std::invalid_argument(who + ": tokens must be [B] int64 (one token per sequence)");
  const int64_t B = tokens.size(0), S = cache.k[0].size(0);
  const int64_t capacity = std::min<int64_t>(cache.k[0].size(2), cfg_.max_seq_len);
  if (int64_t(slots.size()) != B || int64_t(positions.size()) != B)
    throw std::invalid_argument(who + ": " + std::to_string(B) + " tokens but " + std::to_string(slots.size()) +
                                " slots and " + std::to_string(positions.size()) + " positions");
  std::vector<char> taken(S, 0);
  for (int64_t b = 0; b < B; ++b) {
    if (slots[b] < 0 || slots[b] >= S || taken[slots[b]])
      throw std::invalid_argument(who + ": slot " + std::to_string(slots[b]) + " of sequence " + std::to_string(b) +
                                  " is outside [0, " + std::to_string(S) + ") or given twice");
    taken[slots[b]] = 1;
    if (positions[b] < 0 || positions[b] >= capacity)
      throw std::invalid_argument(who + ": position " + std::to_string(positions[b]) + " of sequence " +
                                  std::to_string(b) + " is outside the cache's " + std::to_string(capacity) +
                                  " positions (the sequence is full)");
  }
  if (cache.engram.size() != impl_->engram.size())
    throw std::invalid_argument(who + ": the cache holds " + std::to_string(cache.engram.size()) +
                                " Engram states, the model has " + std::to_string(impl_->engram.size()) +
                                " Engram memories (use make_cache)");
  const auto tok = tokens.view({B, 1});
  check_tokens(tok, cfg_.vocab_size, 1, who, "one token per sequence");
  torch::NoGradGuard no_grad;
  auto logits = impl_->run(cfg_, is_training(), tok, 0, &cache, nullptr, /*record_aux=*/false, &slots, &positions);
  return logits.view({B, logits.size(2)});
}

KVCache TransformerImpl::slot_view(KVCache& cache, int64_t slot, int64_t length) {
  KVCache view;
  if (cache.k.empty()) throw std::invalid_argument("Transformer::slot_view: the cache holds no layer");
  if (slot < 0 || slot >= cache.k[0].size(0))
    throw std::invalid_argument("Transformer::slot_view: slot " + std::to_string(slot) + " outside [0, " +
                                std::to_string(cache.k[0].size(0)) + ")");
  if (length < 0 || length > cache.k[0].size(2))
    throw std::invalid_argument("Transformer::slot_view: length " + std::to_string(length) + " outside [0, " +
                                std::to_string(cache.k[0].size(2)) + "]");
  for (size_t l = 0; l < cache.k.size(); ++l) {
    view.k.push_back(cache.k[l].narrow(0, slot, 1));
    view.v.push_back(cache.v[l].narrow(0, slot, 1));
  }
  // Engram states: the slot's rows, shared (the layer updates its state in place). A view of length 0
  // starts a new sequence in the slot, so its Engram history is reset to a sequence start.
  for (auto& s : cache.engram) {
    EngramState v{s.tokens.narrow(0, slot, 1), s.conv_input.narrow(0, slot, 1)};
    if (length == 0) {
      v.tokens.fill_(-1);
      v.conv_input.zero_();
    }
    view.engram.push_back(v);
  }
  view.length = length;
  return view;
}

std::map<std::string, torch::Tensor> TransformerImpl::aux_losses() const { return impl_->aux; }

void TransformerImpl::set_weight_format(ValueFormat f) {
  auto& m = *impl_;
  for (auto& blk : m.blocks) {
    blk->attn->set_weight_format(f);
    if (blk->dense) blk->dense->set_weight_format(f);
    if (blk->moe) blk->moe->set_weight_format(f);
  }
  m.head_c.set(m.lm_head.defined() ? m.lm_head : m.embedding, f, /*transpose=*/false);
}

ValueFormat TransformerImpl::weight_format() const { return impl_->head_c.format(); }

void TransformerImpl::set_value_prefetch(int64_t bytes) {
  if (bytes < 0) throw std::invalid_argument("set_value_prefetch: bytes must be >= 0 (0: off), got " + std::to_string(bytes));
  impl_->prefetch_bytes = bytes;
}

int64_t TransformerImpl::value_prefetch() const { return impl_->prefetch_bytes; }

void TransformerImpl::set_tiered_reads_ahead(bool on) { impl_->tiered_ahead = on; }

bool TransformerImpl::tiered_reads_ahead() const { return impl_->tiered_ahead; }

int64_t TransformerImpl::compact_weight_bytes() const {
  const auto& m = *impl_;
  int64_t n = m.head_c.bytes();
  for (const auto& blk : m.blocks) {
    n += blk->attn->compact_bytes();
    if (blk->dense) n += blk->dense->compact_bytes();
    if (blk->moe) n += blk->moe->compact_bytes();
  }
  return n;
}

void TransformerImpl::after_optimizer_step() {
  for (auto& m : impl_->ultramem) m->refresh_tucker_approx();
}

ParamGroups TransformerImpl::param_groups() {
  ParamGroups g;
  for (const auto& item : named_parameters(/*recurse=*/true)) {
    const std::string& name = item.key();
    const auto& p = item.value();
    const bool in_memory = name.rfind("memories.", 0) == 0;
    const std::string leaf = name.substr(name.rfind('.') + 1);
    if (in_memory && (leaf == "values" || leaf == "pre_values"))
      g.memory_values.push_back(p);
    else if (name.find(".moe.w_") != std::string::npos)
      g.experts.push_back(p);
    else if (p.dim() < 2 || (in_memory && (leaf == "cores" || leaf == "q_scale" || leaf == "k_scale")))
      g.no_decay.push_back(p);
    else
      g.decay.push_back(p);
  }
  return g;
}

nlohmann::json TransformerImpl::telemetry() {
  nlohmann::json j = nlohmann::json::object();
  auto& m = *impl_;
  for (size_t k = 0; k < m.ultramem.size(); ++k) {
    const auto s = m.ultramem[k]->stats();
    const std::string p = "mem" + std::to_string(k) + ".";
    j[p + "coverage"] = s.coverage;
    j[p + "kl_uniform"] = s.kl_uniform;
    j[p + "top1_score"] = s.top1_score;
    j[p + "topm_score"] = s.topm_score;
    j[p + "output_std"] = s.output_std;
    j[p + "core_l1"] = s.core_l1;
    j[p + "core_l2"] = s.core_l2;
    j[p + "tokens"] = s.tokens;
    // Retrieval quality (null when no token was checked in the window).
    j[p + "recall"] = std::isnan(s.recall) ? nlohmann::json(nullptr) : nlohmann::json(s.recall);
    j[p + "score_mass"] = std::isnan(s.score_mass) ? nlohmann::json(nullptr) : nlohmann::json(s.score_mass);
    j[p + "retrieval_tokens"] = s.retrieval_tokens;
    if (m.ultramem[k]->key_format() != ValueFormat::kFloat32)
      j[p + "key_agreement"] = std::isnan(s.key_agreement) ? nlohmann::json(nullptr) : nlohmann::json(s.key_agreement);
    m.ultramem[k]->reset_stats();
  }
  for (size_t k = 0; k < m.pkm.size(); ++k) {
    auto& w = m.pkm_out[k];
    const std::string p = "mem" + std::to_string(k) + ".";
    const double n = w[2], mean = n > 0 ? w[0] / n : 0.0;
    j[p + "output_std"] = n > 1 ? std::sqrt(std::max(0.0, (w[1] - n * mean * mean) / (n - 1))) : 0.0;
    j[p + "tokens"] = int64_t(n / double(cfg_.d_model));
    w = {0.0, 0.0, 0.0};
  }
  // MoE: per block, the busiest expert's share of the assignments relative to uniform (1 = balanced)
  // and the coefficient of variation of the per-expert counts; reported as max / mean over blocks.
  double load_max = 0, cv_sum = 0;
  int64_t moe_blocks = 0, assignments = 0;
  for (auto& blk : m.blocks) {
    if (!blk->moe) continue;
    const auto& load = blk->moe->load();
    double total = 0, sq = 0, mx = 0;
    for (int64_t c : load) {
      total += double(c);
      sq += double(c) * double(c);
      mx = std::max(mx, double(c));
    }
    const double K = double(load.size());
    if (total > 0) {
      const double mean = total / K;
      load_max = std::max(load_max, mx / mean);
      cv_sum += std::sqrt(std::max(0.0, sq / K - mean * mean)) / mean;
    }
    assignments += int64_t(total);
    ++moe_blocks;
    blk->moe->reset_load();
  }
  if (moe_blocks > 0) {
    j["moe.load_max"] = load_max;
    j["moe.load_cv"] = cv_sum / double(moe_blocks);
    j["moe.assignments"] = assignments;
  }
  return j;
}

}  // namespace ultramem::nn
