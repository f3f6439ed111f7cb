// Sizes of the layers and models compared by `ultramem bench decode`, all derived from one UltraMem
// layer, and the memory traffic per decoded token of each (spec section 8).
//
// From an UltraMem layer with P total parameters and F activated FLOPs per token (counted by
// nn::model_info: query, key scores, TDQKR, pooling, output projection; a multiply-add is 2 FLOPs):
//   * MoE, top-k of K SwiGLU experts of hidden h: total  D*K + 3*D*h*K  = P  and
//                                                 FLOPs  2*D*K + 2*k*3*D*h = F  (solved for K, h);
//   * dense SwiGLU FFN of hidden h: 2*3*D*h = F;
//   * PKM with the same number of value rows N and the same value width Dv (not FLOP-matched).
// Whole models: a backbone of dense blocks plus one memory layer; the dense model widens every
// block's FFN and the MoE model makes every block an MoE so that total FLOPs (dense and MoE) and
// total parameters (MoE) equal the UltraMem model's.
#pragma once
#include <cstdint>
#include <nlohmann/json_fwd.hpp>
#include <string>

#include "ultramem/nn/memory_config.h"
#include "ultramem/nn/model_config.h"

namespace ultramem::perf {

// Parameters (total and read per token) and forward FLOPs per token of one layer or model.
struct Cost {
  int64_t params = 0;
  int64_t params_activated = 0;
  double flops = 0;
};

// The layers of one comparison point (one N).
struct LayerSizes {
  nn::UltraMemConfig ultramem;  // D, n, E, Dk, Dv, r, C, H, m, m_first as given; N = n*n/E
  nn::PKMConfig pkm;            // n = sqrt(N), same Dv; H = 4, m = 32, Dk as UltraMem, LayerNorm query
  int64_t moe_experts = 0;      // K
  int64_t moe_top_k = 2;        // k
  int64_t moe_hidden = 0;       // SwiGLU hidden width of one expert
  int64_t dense_hidden = 0;     // SwiGLU hidden width of the dense FFN
  Cost ultramem_cost, pkm_cost, moe_cost, dense_cost;
};

// Derives the MoE, dense and PKM layers from `um` (validated; its D is the model width).
// Throws std::invalid_argument when N = n*n/E has no integer square root (PKM) or a size is degenerate.
LayerSizes derive_layer_sizes(const nn::UltraMemConfig& um, int64_t moe_top_k = 2);

// The models of one comparison point: identical backbones (embedding, attention, norms), and
//   ultramem:    dense FFN of base_hidden in every block + one UltraMem layer at `placement`;
//   pkm:         the same with a PKM layer (LayerSizes::pkm) instead;
//   ultramem_v2: the same layer with UltraMemV2's changes (query per rank, one projection, pre-values
//                of Dv / 3) at the same placement, the FFNs resized to the UltraMem model's FLOPs;
//   engram:      an Engram memory at each read block of `placement` (4 heads, d_e = Dv, rows = N: its
//                tables hold N * Dv values like the UltraMem table), the FFNs resized to equal FLOPs;
//   dense:       every block's FFN widened to equal the UltraMem model's FLOPs;
//   moe:         every block an MoE (top-k), equal FLOPs and equal total parameters.
struct ModelSizes {
  nn::ModelConfig ultramem, pkm, ultramem_v2, engram, dense, moe;
  Cost ultramem_cost, pkm_cost, ultramem_v2_cost, engram_cost, dense_cost, moe_cost;  // nn::model_info at `context`
};

// backbone: vocab, d_model, n_layers, n_heads, max_seq_len, ffn_hidden (= base_hidden), seed;
// its ffn / memory fields are replaced. um: the memory layer (D is set to backbone.d_model).
ModelSizes derive_model_sizes(const nn::ModelConfig& backbone, const nn::UltraMemConfig& um,
                              const std::string& placement, int64_t context, int64_t moe_top_k = 2);

// Solves D*K + 3*D*h*K = params and 2*D*K + 2*k*3*D*h = flops for integers K >= k, h >= 1
// (the closest pair by the larger relative error). Throws std::invalid_argument when infeasible.
void solve_moe(int64_t D, int64_t top_k, int64_t params, double flops, int64_t& experts, int64_t& hidden);

// ---- memory traffic per decode step (spec section 8) -----------------------------------------------

// Expected distinct rows among B tokens that each read `per_token` rows uniformly from `rows`:
// rows * (1 - (1 - per_token/rows)^B).
double expected_distinct_rows(double rows, double per_token, int64_t B);

// Expected distinct experts used by B tokens routing top-k of K: K * (1 - (1 - k/K)^B).
double expected_distinct_experts(int64_t K, int64_t k, int64_t B);

// Bytes read by one decode step of B tokens. value_row_bytes: bytes of one value row in the table's
// storage format (including a per-row scale if any); dense_elem_bytes: bytes per dense parameter.
struct Traffic {
  double dense_bytes = 0;  // parameters read once per step (and the touched experts of an MoE)
  double row_bytes = 0;    // value rows read at random (memory layers), distinct rows only
  double total() const { return dense_bytes + row_bytes; }
};
// key_elem_bytes: bytes per key element (compact keys: 2 for bf16, about 1 for int8); < 0 means
// dense_elem_bytes.
Traffic ultramem_traffic(const nn::UltraMemConfig& c, int64_t B, double value_row_bytes, double dense_elem_bytes = 4,
                         double key_elem_bytes = -1);
Traffic pkm_traffic(const nn::PKMConfig& c, int64_t B, double value_row_bytes, double dense_elem_bytes = 4);
// Engram: the projections, norms and taps once, and per token one row of each of the 2*heads tables
// (distinct rows per table). value_row_bytes: bytes of one full concatenated row e [d_e].
Traffic engram_traffic(const nn::EngramConfig& c, int64_t B, double value_row_bytes, double dense_elem_bytes = 4);
Traffic moe_traffic(int64_t D, int64_t K, int64_t k, int64_t hidden, int64_t B, double elem_bytes = 4);
Traffic dense_traffic(int64_t D, int64_t hidden, int64_t B, double elem_bytes = 4);
// A whole model's decode step at `context` cached positions: every non-memory, non-expert parameter,
// the touched experts, the memory layers' dense parts and rows (UltraMem and UltraMemV2: value_row_bytes
// per row, pre-values included; PKM; Engram: value_row_bytes per concatenated row), and the KV cache (fp32).
// weight_elem_bytes: bytes per element of the matrices set_weight_format compacts (LM head, attention,
// dense FFN, experts): 4, 2 (bf16) or about 1 (int8 with a row scale).
Traffic model_traffic(const nn::ModelConfig& c, int64_t B, int64_t context, double value_row_bytes,
                      double key_elem_bytes = 4, double weight_elem_bytes = 4);

nlohmann::json cost_to_json(const Cost& c);
nlohmann::json layer_sizes_to_json(const LayerSizes& s);

}  // namespace ultramem::perf
