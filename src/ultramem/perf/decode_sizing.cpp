#include "ultramem/perf/decode_sizing.h"

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>

#include "ultramem/nn/model_info.h"

namespace ultramem::perf {
namespace {

// Sum of the named parts of a model_info.
Cost parts_cost(const nn::ModelInfo& info, std::initializer_list<const char*> names) {
  Cost c;
  for (const char* n : names)
    if (const auto* p = info.find(n)) {
      c.params += p->params_total;
      c.params_activated += p->params_activated;
      c.flops += p->flops;
    }
  return c;
}

Cost total_cost(const nn::ModelInfo& info) { return {info.params_total, info.params_activated, info.flops_per_token}; }

// A one-block model of width D holding only the layer under study (vocab 2, one attention head);
// model_info's parts for that layer give its cost with the project's one set of formulas.
nn::ModelConfig one_block(int64_t D) {
  nn::ModelConfig m;
  m.vocab_size = 2;
  m.d_model = D;
  m.n_layers = 1;
  m.n_heads = 1;
  m.max_seq_len = 2;
  m.ffn = {nn::FfnKind::None};
  return m;
}

int64_t isqrt_exact(int64_t v) {
  int64_t r = static_cast<int64_t>(std::llround(std::sqrt(double(v))));
  while (r * r > v) --r;
  while ((r + 1) * (r + 1) <= v) ++r;
  return r * r == v ? r : -1;
}

double rel_err(double got, double want) { return want == 0 ? std::abs(got) : std::abs(got - want) / std::abs(want); }

}  // namespace

void solve_moe(int64_t D, int64_t top_k, int64_t params, double flops, int64_t& experts, int64_t& hidden) {
  if (D < 1 || top_k < 1 || params < 1 || !(flops > 0))
    throw std::invalid_argument("solve_moe: D, top_k, params and flops must be positive");
  auto P = [&](int64_t K, int64_t h) { return double(D) * K + 3.0 * D * h * K; };
  auto F = [&](int64_t K, int64_t h) { return 2.0 * D * K + 2.0 * top_k * 3.0 * D * h; };
  int64_t K = top_k, h = 1;
  for (int it = 0; it < 200; ++it) {
    const double rest = flops - 2.0 * D * K;
    if (rest <= 0)
      throw std::invalid_argument("solve_moe: the router of " + std::to_string(K) + " experts alone exceeds " +
                                  std::to_string(flops) + " FLOPs; no MoE has these FLOPs and parameters");
    h = std::max<int64_t>(1, std::llround(rest / (2.0 * top_k * 3.0 * D)));
    const int64_t K2 = std::max<int64_t>(top_k, std::llround(double(params) / (D + 3.0 * D * h)));
    if (K2 == K) break;
    K = K2;
  }
  double best = 1e300;
  int64_t bk = K, bh = h;
  for (int64_t k2 = std::max<int64_t>(top_k, K - 3); k2 <= K + 3; ++k2)
    for (int64_t h2 = std::max<int64_t>(1, h - 3); h2 <= h + 3; ++h2) {
      const double e = std::max(rel_err(P(k2, h2), double(params)), rel_err(F(k2, h2), flops));
      if (e < best) {
        best = e;
        bk = k2;
        bh = h2;
      }
    }
  experts = bk;
  hidden = bh;
}

LayerSizes derive_layer_sizes(const nn::UltraMemConfig& um, int64_t moe_top_k) {
  um.validate();
  LayerSizes s;
  s.ultramem = um;
  s.moe_top_k = moe_top_k;
  const int64_t D = um.D, N = um.physical_rows();

  nn::ModelConfig m = one_block(D);
  m.memory_kind = nn::MemoryKind::UltraMem;
  m.memory_placement = {{1, 1}};
  m.ultramem = um;
  s.ultramem_cost = parts_cost(nn::model_info(m), {"memory_dense", "memory_values"});

  const int64_t pn = isqrt_exact(N);
  if (pn < 1)
    throw std::invalid_argument("derive_layer_sizes: N = n*n/E = " + std::to_string(N) +
                                " is not a square, so no PKM with the same rows exists (use an even log2 N)");
  s.pkm.D = D;
  s.pkm.n = pn;
  s.pkm.Dk = um.Dk;
  s.pkm.Dv = um.Dv;
  s.pkm.H = 4;
  s.pkm.m = std::min<int64_t>(32, pn);
  s.pkm.query_norm = nn::PKMConfig::QueryNorm::Layer;
  s.pkm.seed = um.seed + 1;
  s.pkm.validate();
  m.memory_kind = nn::MemoryKind::PKM;
  m.pkm = s.pkm;
  s.pkm_cost = parts_cost(nn::model_info(m), {"memory_dense", "memory_values"});

  const double F = s.ultramem_cost.flops;
  solve_moe(D, moe_top_k, s.ultramem_cost.params, F, s.moe_experts, s.moe_hidden);
  nn::ModelConfig moe = one_block(D);
  moe.ffn = {nn::FfnKind::MoE};
  moe.moe.num_experts = s.moe_experts;
  moe.moe.top_k = moe_top_k;
  moe.moe.expert_hidden = s.moe_hidden;
  s.moe_cost = parts_cost(nn::model_info(moe), {"moe_router", "moe_experts"});

  s.dense_hidden = std::max<int64_t>(1, std::llround(F / (6.0 * D)));
  nn::ModelConfig dense = one_block(D);
  dense.ffn = {nn::FfnKind::Dense};
  dense.ffn_hidden = s.dense_hidden;
  s.dense_cost = parts_cost(nn::model_info(dense), {"dense_ffn"});
  return s;
}

ModelSizes derive_model_sizes(const nn::ModelConfig& backbone, const nn::UltraMemConfig& um,
                              const std::string& placement, int64_t context, int64_t moe_top_k) {
  ModelSizes s;
  nn::ModelConfig base = backbone;
  base.ffn = {nn::FfnKind::Dense};
  base.memory_placement.clear();
  base.validate();
  const int64_t D = base.d_model, L = base.n_layers;

  nn::UltraMemConfig mem = um;
  mem.D = D;
  const LayerSizes layer = derive_layer_sizes(mem, moe_top_k);

  s.ultramem = base;
  s.ultramem.name = "bench-ultramem";
  s.ultramem.memory_kind = nn::MemoryKind::UltraMem;
  s.ultramem.memory_placement = nn::parse_placement(placement, L);
  s.ultramem.ultramem = mem;
  s.ultramem.validate();
  s.ultramem_cost = total_cost(nn::model_info(s.ultramem, context));

  s.pkm = base;
  s.pkm.name = "bench-pkm";
  s.pkm.memory_kind = nn::MemoryKind::PKM;
  s.pkm.memory_placement = s.ultramem.memory_placement;
  s.pkm.pkm = layer.pkm;
  s.pkm.validate();
  s.pkm_cost = total_cost(nn::model_info(s.pkm, context));

  // Everything but the FFNs: the backbone's cost minus its dense FFNs.
  const Cost with_base = total_cost(nn::model_info(base, context));
  const double ffn_flops = 2.0 * 3 * D * base.ffn_hidden * L;
  const int64_t ffn_params = 3 * D * base.ffn_hidden * L;
  const double rest_flops = with_base.flops - ffn_flops;
  const int64_t rest_params = with_base.params - ffn_params;

  // A model whose FFNs are resized so that its FLOPs equal the UltraMem model's.
  auto match_flops = [&](nn::ModelConfig& c, Cost& cost) {
    const double other = total_cost(nn::model_info(c, context)).flops - 6.0 * D * double(c.ffn_hidden) * L;
    c.ffn_hidden = std::max<int64_t>(1, std::llround((s.ultramem_cost.flops - other) / (6.0 * D * L)));
    c.validate();
    cost = total_cost(nn::model_info(c, context));
  };

  s.ultramem_v2 = s.ultramem;
  s.ultramem_v2.name = "bench-ultramem-v2";
  s.ultramem_v2.memory_kind = nn::MemoryKind::UltraMemV2;
  s.ultramem_v2.ultramem_v2 = mem;
  s.ultramem_v2.ultramem_v2.query_per_rank = true;
  s.ultramem_v2.ultramem_v2.single_projection = true;
  s.ultramem_v2.ultramem_v2.Dp = std::max<int64_t>(1, mem.Dv / 3);
  s.ultramem_v2.ultramem_v2.aux_loss = false;
  match_flops(s.ultramem_v2, s.ultramem_v2_cost);

  s.engram = base;
  s.engram.name = "bench-engram";
  s.engram.memory_kind = nn::MemoryKind::Engram;
  s.engram.memory_placement = s.ultramem.memory_placement;
  for (auto& p : s.engram.memory_placement) p.write_block = p.read_block;  // Engram adds its output where it reads
  s.engram.engram.heads = 4;
  s.engram.engram.d_e = std::max<int64_t>(8, mem.Dv / 8 * 8);
  s.engram.engram.rows = mem.physical_rows();
  match_flops(s.engram, s.engram_cost);

  s.dense = base;
  s.dense.name = "bench-dense";
  s.dense.ffn_hidden = std::max<int64_t>(1, std::llround((s.ultramem_cost.flops - rest_flops) / (6.0 * D * L)));
  s.dense.validate();
  s.dense_cost = total_cost(nn::model_info(s.dense, context));

  s.moe = base;
  s.moe.name = "bench-moe";
  s.moe.ffn = {nn::FfnKind::MoE};
  s.moe.moe.top_k = moe_top_k;
  solve_moe(D, moe_top_k, (s.ultramem_cost.params - rest_params) / L, (s.ultramem_cost.flops - rest_flops) / double(L),
            s.moe.moe.num_experts, s.moe.moe.expert_hidden);
  s.moe.validate();
  s.moe_cost = total_cost(nn::model_info(s.moe, context));
  return s;
}

double expected_distinct_rows(double rows, double per_token, int64_t B) {
  if (rows <= 0 || per_token <= 0 || B <= 0) return 0;
  const double p = std::min(1.0, per_token / rows);
  return rows * -std::expm1(double(B) * std::log1p(-p));  // rows * (1 - (1 - p)^B), accurate for small p
}

double expected_distinct_experts(int64_t K, int64_t k, int64_t B) {
  return expected_distinct_rows(double(K), double(k), B);
}

Traffic ultramem_traffic(const nn::UltraMemConfig& c, int64_t B, double value_row_bytes, double dense_elem_bytes,
                         double key_elem_bytes) {
  Traffic t;
  const double queries = c.query_per_rank ? double(c.r) : 1.0;   // query halves per side
  const double outputs = c.single_projection ? 1.0 : double(c.E);  // wo: [outputs * Dv, D]
  const double dense = double(c.D) * 2 * c.Dk * queries + 2.0 * c.Dk + 2.0 * c.Dk + double(c.C) * c.H * c.r * c.r +
                       outputs * c.Dv * c.D + double(c.D) * c.Dp;
  const double keys = double(c.H) * 2 * c.n * c.Dk * c.r;
  t.dense_bytes = dense * dense_elem_bytes + keys * (key_elem_bytes < 0 ? dense_elem_bytes : key_elem_bytes);
  t.row_bytes = expected_distinct_rows(double(c.physical_rows()), double(c.H * c.m), B) * value_row_bytes;
  return t;
}

Traffic pkm_traffic(const nn::PKMConfig& c, int64_t B, double value_row_bytes, double dense_elem_bytes) {
  Traffic t;
  const int64_t q_heads = c.shared_query ? 1 : c.H;
  double dense = double(c.D) * q_heads * 2 * c.Dk + double(c.H) * 2 * c.n * c.Dk;
  if (c.Dv != c.D) dense += double(c.Dv) * c.D;
  t.dense_bytes = dense * dense_elem_bytes;
  t.row_bytes = expected_distinct_rows(double(c.n) * c.n, double(c.H * c.m), B) * value_row_bytes;
  return t;
}

Traffic engram_traffic(const nn::EngramConfig& c, int64_t B, double value_row_bytes, double dense_elem_bytes) {
  Traffic t;
  t.dense_bytes = (2.0 * c.d_e * c.D + 3.0 * c.D + double(c.D) * c.kernel) * dense_elem_bytes;
  double rows = 0;  // distinct rows over the tables, each read once per token
  for (const int64_t m : c.table_sizes()) rows += expected_distinct_rows(double(m), 1.0, B);
  t.row_bytes = rows * value_row_bytes / double(c.tables());
  return t;
}

Traffic moe_traffic(int64_t D, int64_t K, int64_t k, int64_t hidden, int64_t B, double elem_bytes) {
  Traffic t;
  t.dense_bytes = (double(D) * K + expected_distinct_experts(K, k, B) * 3.0 * D * hidden) * elem_bytes;
  return t;
}

Traffic dense_traffic(int64_t D, int64_t hidden, int64_t B, double elem_bytes) {
  Traffic t;
  t.dense_bytes = 3.0 * D * hidden * elem_bytes;
  return t;
}

Traffic model_traffic(const nn::ModelConfig& c, int64_t B, int64_t context, double value_row_bytes,
                      double key_elem_bytes, double weight_elem_bytes) {
  Traffic t;
  const double D = double(c.d_model), L = double(c.n_layers), V = double(c.vocab_size);
  double elems = V * D;                                // the head reads the whole (tied or own) table
  double float_elems = c.tie_embeddings ? 0.0 : double(B) * D;  // the B embedding rows (untied: float)
  elems += L * 4 * D * D;                              // attention projections
  float_elems += (2 * L + 1) * D;                      // norms
  for (int64_t b = 0; b < c.n_layers; ++b) {
    const auto kind = c.ffn_kind(b);
    if (kind == nn::FfnKind::Dense) elems += 3 * D * double(c.ffn_hidden);
    if (kind == nn::FfnKind::MoE) {
      const auto m = moe_traffic(c.d_model, c.moe.num_experts, c.moe.top_k, c.moe_expert_hidden(), B, 4.0);
      elems += m.dense_bytes / 4.0;
    }
  }
  t.dense_bytes = elems * weight_elem_bytes + float_elems * 4.0 +
                  L * double(B) * 2.0 * double(context + 1) * D * 4.0;  // + KV cache
  for (size_t k = 0; k < c.memory_placement.size(); ++k) {
    Traffic m;
    if (c.memory_kind == nn::MemoryKind::PKM)
      m = pkm_traffic(c.pkm_layer_config(int64_t(k)), B, value_row_bytes);
    else if (c.memory_kind == nn::MemoryKind::Engram)
      m = engram_traffic(c.engram_layer_config(int64_t(k)), B, value_row_bytes);
    else
      m = ultramem_traffic(c.ultramem_layer_config(int64_t(k)), B, value_row_bytes, 4.0, key_elem_bytes);
    t.dense_bytes += m.dense_bytes;
    t.row_bytes += m.row_bytes;
  }
  return t;
}

nlohmann::json cost_to_json(const Cost& c) {
  return {{"params", c.params}, {"params_activated", c.params_activated}, {"flops_per_token", c.flops}};
}

nlohmann::json layer_sizes_to_json(const LayerSizes& s) {
  const auto& u = s.ultramem;
  const auto& p = s.pkm;
  return {{"ultramem",
           {{"D", u.D},
            {"n", u.n},
            {"E", u.E},
            {"N", u.physical_rows()},
            {"Dk", u.Dk},
            {"Dv", u.Dv},
            {"r", u.r},
            {"C", u.C},
            {"H", u.H},
            {"m", u.m},
            {"m_first", u.first_stage_m()},
            {"cost", cost_to_json(s.ultramem_cost)}}},
          {"moe",
           {{"experts", s.moe_experts},
            {"top_k", s.moe_top_k},
            {"expert_hidden", s.moe_hidden},
            {"cost", cost_to_json(s.moe_cost)}}},
          {"dense", {{"hidden", s.dense_hidden}, {"cost", cost_to_json(s.dense_cost)}}},
          {"pkm",
           {{"n", p.n},
            {"N", p.n * p.n},
            {"Dk", p.Dk},
            {"Dv", p.Dv},
            {"H", p.H},
            {"m", p.m},
            {"cost", cost_to_json(s.pkm_cost)}}}};
}

}  // namespace ultramem::perf
