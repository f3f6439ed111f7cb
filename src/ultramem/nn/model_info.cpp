#include "ultramem/nn/model_info.h"

#include <algorithm>
#include <cstdio>
#include <stdexcept>
#include <string>

#include <nlohmann/json.hpp>

#include "ultramem/io/process_memory.h"

namespace ultramem::nn {
namespace {

// Accumulates into named parts, keeping first-seen order of the canonical list.
class Parts {
 public:
  Parts() {
    for (const char* n : {"embedding", "lm_head", "attention", "norms", "dense_ffn", "moe_router", "moe_experts",
                          "memory_dense", "memory_values"})
      parts_.push_back(ModelInfoPart{n});
  }
  void add(const std::string& name, int64_t total, int64_t activated, double flops) {
    for (auto& p : parts_)
      if (p.name == name) {
        p.params_total += total;
        p.params_activated += activated;
        p.flops += flops;
        used_[&p - parts_.data()] = true;
        return;
      }
  }
  std::vector<ModelInfoPart> take() const {
    std::vector<ModelInfoPart> out;
    for (size_t i = 0; i < parts_.size(); ++i)
      if (used_[i]) out.push_back(parts_[i]);
    return out;
  }

 private:
  std::vector<ModelInfoPart> parts_;
  bool used_[9] = {};
};

std::string with_commas(int64_t v) {
  std::string s = std::to_string(v < 0 ? -v : v);
  for (int i = int(s.size()) - 3; i > 0; i -= 3) s.insert(size_t(i), ",");
  return v < 0 ? "-" + s : s;
}

}  // namespace

const ModelInfoPart* ModelInfo::find(const std::string& name) const {
  for (const auto& p : parts)
    if (p.name == name) return &p;
  return nullptr;
}

namespace {

// model_info without validate(): for a config within ModelConfig's bounds (validate() counts the
// parameters with it after checking them; with them no count overflows int64_t).
ModelInfo model_info_within_bounds(const ModelConfig& cfg, int64_t context) {
  const int64_t D = cfg.d_model, V = cfg.vocab_size, L = cfg.n_layers;
  ModelInfo info;
  info.context = context > 0 ? context : std::max<int64_t>(1, cfg.max_seq_len / 2);
  const double ctx = double(info.context);
  Parts parts;

  // Embedding lookup reads one row; a tied table is read whole by the head.
  parts.add("embedding", V * D, cfg.tie_embeddings ? V * D : D, 0.0);
  parts.add("lm_head", cfg.tie_embeddings ? 0 : V * D, cfg.tie_embeddings ? 0 : V * D, 2.0 * D * V);

  std::vector<bool> memory_reads(L, false);
  for (const auto& p : cfg.memory_placement) memory_reads[p.read_block - 1] = true;
  for (int64_t b = 0; b < L; ++b) {
    // wqkv [D, 3D] + wo [D, D]; scores q.k and the weighted sum of v over ctx keys.
    parts.add("attention", 4 * D * D, 4 * D * D, 2.0 * 4 * D * D + 4.0 * ctx * D);
    const FfnKind kind = cfg.ffn_kind(b);
    const bool ffn_norm = kind != FfnKind::None || memory_reads[b];
    parts.add("norms", D * (1 + (ffn_norm ? 1 : 0)), D * (1 + (ffn_norm ? 1 : 0)), 0.0);
    if (kind == FfnKind::Dense) {
      const int64_t p = 3 * D * cfg.ffn_hidden;
      parts.add("dense_ffn", p, p, 2.0 * p);
    } else if (kind == FfnKind::MoE) {
      const int64_t K = cfg.moe.num_experts, k = cfg.moe.top_k, He = cfg.moe_expert_hidden();
      parts.add("moe_router", D * K, D * K, 2.0 * D * K);
      parts.add("moe_experts", K * 3 * D * He, k * 3 * D * He, 2.0 * k * 3 * D * He);
    }
  }
  parts.add("norms", D, D, 0.0);  // final norm

  for (size_t k = 0; k < cfg.memory_placement.size(); ++k) {
    if (is_ultramem(cfg.memory_kind)) {
      const auto c = cfg.ultramem_layer_config(int64_t(k));
      const int64_t m1 = c.first_stage_m(), Q = c.query_ranks(), G = c.projection_groups();
      const int64_t dense = D * 2 * Q * c.Dk + 2 * c.Dk + c.H * 2 * c.n * c.Dk * c.r + 2 * c.Dk +
                            c.C * c.H * c.r * c.r + G * c.Dv * D + D * c.Dp;
      double flops = 2.0 * D * 2 * Q * c.Dk;                // query projection (one per rank with V2)
      flops += 2.0 * 2 * c.n * c.H * c.r * c.Dk;            // row and column key scores
      flops += 2.0 * c.H * 2 * c.r * c.n;                   // rank-1 filter u^T S_row, v^T S_col
      flops += 2.0 * c.H * (c.r * c.r * m1 + c.r * m1 * m1);  // summed-core rescoring of m1 x m1
      flops += 2.0 * c.H * c.m * c.C * (c.r * c.r + c.r);   // per-core scores of the kept m
      flops += 2.0 * D * c.Dp;                              // pre-value query (V2)
      flops += 2.0 * G * c.Dv * D;                          // output projection (one with V2)
      parts.add("memory_dense", dense, dense, flops);
      // Values and pre-values: the H*m kept rows of each are read; <p, P[row]> and the weighted sum.
      parts.add("memory_values", c.physical_rows() * (c.Dv + c.Dp), c.H * c.m * (c.Dv + c.Dp),
                2.0 * c.H * c.m * (c.Dv + c.Dp));
    } else if (cfg.memory_kind == MemoryKind::Engram) {
      const auto c = cfg.engram_layer_config(int64_t(k));
      int64_t rows = 0;
      for (const int64_t m : c.table_sizes()) rows += m;  // the stacked tables (nn/engram.h)
      const int64_t dense = 2 * c.d_e * D + 3 * D + D * c.kernel;
      double flops = 2.0 * 2 * c.d_e * D;  // key and value projections of the concatenated rows
      flops += 2.0 * D;                    // the gate's dot product
      flops += 2.0 * D * c.kernel;         // the causal depthwise convolution
      parts.add("memory_dense", dense, dense, flops);
      parts.add("memory_values", rows * c.row_width(), c.d_e, 0.0);  // 2*heads rows read, no arithmetic
    } else {
      const auto c = cfg.pkm_layer_config(int64_t(k));
      const int64_t q_heads = c.shared_query ? 1 : c.H;
      int64_t dense = D * q_heads * 2 * c.Dk + c.H * 2 * c.n * c.Dk;
      if (c.Dv != D) dense += c.Dv * D;
      if (c.query_norm == PKMConfig::QueryNorm::Batch) dense += 2 * q_heads * 2 * c.Dk;
      if (c.query_norm == PKMConfig::QueryNorm::Layer) dense += 2 * c.Dk;
      double flops = 2.0 * D * q_heads * 2 * c.Dk;  // queries (per head, or one shared)
      flops += 2.0 * c.H * 2 * c.n * c.Dk;       // row and column key scores
      flops += double(c.H) * c.m * c.m;          // additive scores of the m x m candidates
      if (c.Dv != D) flops += 2.0 * c.Dv * D;    // output projection
      parts.add("memory_dense", dense, dense, flops);
      parts.add("memory_values", c.n * c.n * c.Dv, c.H * c.m * c.Dv, 2.0 * c.H * c.m * c.Dv);
    }
  }

  info.parts = parts.take();
  for (const auto& p : info.parts) {
    info.params_total += p.params_total;
    info.params_activated += p.params_activated;
    info.flops_per_token += p.flops;
  }
  return info;
}

}  // namespace

ModelInfo model_info(const ModelConfig& cfg, int64_t context) {
  cfg.validate();
  return model_info_within_bounds(cfg, context);
}

int64_t count_parameters(const ModelConfig& c) { return model_info_within_bounds(c, 0).params_total; }

MemoryNeed inference_memory(const ModelInfo& info, bool without_value_tables) {
  const ModelInfoPart* values = info.find("memory_values");
  const int64_t params = info.params_total - (without_value_tables && values ? values->params_total : 0);
  return MemoryNeed{4.0 * double(params), 0, 0};
}

MemoryNeed training_memory(const ModelConfig& cfg, const ModelInfo& info, int64_t batch_size, int64_t seq_len) {
  MemoryNeed need;
  need.weights = 4.0 * double(info.params_total);
  need.optimizer = 3 * need.weights;
  double per_token = 3.0 * double(cfg.vocab_size);  // logits, their softmax and its gradient
  for (int64_t b = 0; b < cfg.n_layers; ++b) {
    const FfnKind kind = cfg.ffn_kind(b);
    const double ffn = kind == FfnKind::Dense ? 3.0 * double(cfg.ffn_hidden)
                       : kind == FfnKind::MoE ? 3.0 * double(cfg.moe.top_k) * double(cfg.moe_expert_hidden())
                                              : 0.0;
    per_token += 16.0 * double(cfg.d_model) + ffn + 2.0 * double(cfg.n_heads) * double(seq_len);
  }
  for (size_t k = 0; k < cfg.memory_placement.size(); ++k) {
    if (is_ultramem(cfg.memory_kind)) {
      const auto c = cfg.ultramem_layer_config(int64_t(k));
      per_token += double(c.H) * double(c.m) * double(c.Dv + c.Dp) + double(c.E) * double(c.Dv) +
                   4.0 * double(c.Dk) * double(c.query_ranks()) + double(c.Dp);
    } else if (cfg.memory_kind == MemoryKind::Engram) {
      const auto c = cfg.engram_layer_config(int64_t(k));
      per_token += double(c.d_e) + 8.0 * double(cfg.d_model);
    } else {
      const auto c = cfg.pkm_layer_config(int64_t(k));
      per_token += double(c.H) * double(c.m) * double(c.Dv) + double(c.Dv) + 4.0 * double(c.Dk) * double(c.H);
    }
  }
  need.activations = 4.0 * per_token * double(batch_size) * double(seq_len);
  return need;
}

void check_fits_in_memory(const std::string& what, const MemoryNeed& need) {
  const int64_t have = io::total_memory_bytes();
  if (have <= 0 || need.total() <= double(have)) return;
  auto gib = [](double bytes) {
    char s[32];
    std::snprintf(s, sizeof s, "%.1f GiB", bytes / double(int64_t(1) << 30));
    return std::string(s);
  };
  std::string parts = gib(need.weights) + " of fp32 weights";
  if (need.optimizer > 0) parts += ", " + gib(need.optimizer) + " of gradients and optimizer moments";
  if (need.activations > 0) parts += ", " + gib(need.activations) + " of activations";
  throw std::invalid_argument(what + " needs about " + gib(need.total()) + " (" + parts + "); this machine has " +
                              gib(double(have)) + " of memory and swap");
}

std::string model_info_table(const ModelInfo& info) {
  std::string out;
  char line[160];
  std::snprintf(line, sizeof line, "%-14s %16s %18s %14s\n", "part", "params", "activated/token", "MFLOPs/token");
  out += line;
  auto row = [&](const std::string& name, int64_t total, int64_t act, double flops) {
    std::snprintf(line, sizeof line, "%-14s %16s %18s %14.3f\n", name.c_str(), with_commas(total).c_str(),
                  with_commas(act).c_str(), flops / 1e6);
    out += line;
  };
  for (const auto& p : info.parts) row(p.name, p.params_total, p.params_activated, p.flops);
  row("total", info.params_total, info.params_activated, info.flops_per_token);
  out += "(forward; multiply-add = 2 FLOPs; attention at " + std::to_string(info.context) + " keys per query)\n";
  return out;
}

nlohmann::json model_info_to_json(const ModelInfo& info) {
  nlohmann::json parts = nlohmann::json::object();
  for (const auto& p : info.parts)
    parts[p.name] = {{"params", p.params_total}, {"params_activated", p.params_activated}, {"flops", p.flops}};
  return {{"params", info.params_total},
          {"params_activated", info.params_activated},
          {"flops_per_token", info.flops_per_token},
          {"attention_context", info.context},
          {"parts", parts}};
}

}  // namespace ultramem::nn
