// Configuration of a decoder-only language model: blocks, FFN kind per block, memory layers and
// their skip-layer placement. Read from / written to JSON (configs/*.json, checkpoints).
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "ultramem/nn/memory_config.h"

namespace ultramem::nn {

enum class FfnKind { Dense, MoE, None };
// UltraMemV2 (spec section 11) is an UltraMem layer with the V2 switches on: kind "ultramem_v2", whose
// template (memory.ultramem_v2) starts from UltraMemConfig::v2_defaults().
enum class MemoryKind { UltraMem, PKM, UltraMemV2, Engram };
inline bool is_ultramem(MemoryKind k) { return k == MemoryKind::UltraMem || k == MemoryKind::UltraMemV2; }

struct MoEConfig {
  int64_t num_experts = 8;      // K experts
  int64_t top_k = 2;            // experts per token
  int64_t expert_hidden = 0;    // SwiGLU hidden width of one expert; 0 means ffn_hidden / top_k
  double balance_coef = 0.01;   // load-balancing auxiliary loss coefficient
};

// One memory layer: reads the FFN-norm output of block `read_block`, its output is added to the
// residual stream after block `write_block` (1-based, read_block <= write_block). Spec section 2.
struct MemoryPlacement {
  int64_t read_block = 1;
  int64_t write_block = 1;
};

// Parses "1:3/4:6" (1-based blocks). Throws std::invalid_argument naming the bad part.
std::vector<MemoryPlacement> parse_placement(const std::string& s, int64_t n_layers);
std::string placement_to_string(const std::vector<MemoryPlacement>& p);

struct ModelConfig {
  std::string name = "model";
  int64_t vocab_size = 8192;
  int64_t d_model = 256;
  int64_t n_layers = 4;
  int64_t n_heads = 4;          // attention heads; d_model % n_heads == 0, head dim even (RoPE)
  int64_t max_seq_len = 256;
  int64_t ffn_hidden = 683;     // SwiGLU hidden width of the dense FFN
  double rope_theta = 10000.0;
  double norm_eps = 1e-5;       // RMSNorm epsilon
  double init_std = 0.02;       // N(0, init_std) for linear weights and embeddings
  double dropout = 0.0;
  bool tie_embeddings = true;
  std::vector<FfnKind> ffn;     // per block; a single entry applies to every block
  MoEConfig moe;
  MemoryKind memory_kind = MemoryKind::UltraMem;
  std::vector<MemoryPlacement> memory_placement;  // empty: no memory layers
  UltraMemConfig ultramem;      // template for every UltraMem layer (D and num_layers are filled in)
  UltraMemConfig ultramem_v2 = UltraMemConfig::v2_defaults();  // template of kind ultramem_v2 (inner_ratio too)
  PKMConfig pkm;                // template for every PKM layer (D is filled in)
  EngramConfig engram;          // template of kind engram (memory.engram; D and seed filled in)
  // Overrides of the automatic sparse-value-gradient rule (see memory_config_for); JSON
  // memory.ultramem.sparse_value_grad / memory.pkm.sparse_value_grad. Unset: automatic.
  std::optional<bool> ultramem_sparse_value_grad;
  std::optional<bool> ultramem_v2_sparse_value_grad;
  std::optional<bool> pkm_sparse_value_grad;
  uint64_t seed = 0;            // dense weights use it; memory layer k uses seed + 1 + k

  // Value tables with at least this many entries (rows * Dv) get sparse COO value gradients.
  static constexpr int64_t kSparseValueGradMinEntries = int64_t(1) << 22;
  // Upper bounds of validate(). Token ids are int32; the others keep every parameter count in int64_t
  // (docs/reliability.md) and are far above any model this code can train.
  static constexpr int64_t kMaxVocabSize = (int64_t(1) << 31) - 1;
  static constexpr int64_t kMaxWidth = int64_t(1) << 16;      // d_model
  static constexpr int64_t kMaxLayers = 1024;                 // n_layers, memory layers
  static constexpr int64_t kMaxSeqLen = int64_t(1) << 22;
  static constexpr int64_t kMaxHidden = int64_t(1) << 20;     // ffn_hidden, moe.expert_hidden
  static constexpr int64_t kMaxExperts = 4096;
  static constexpr int64_t kMaxParameters = int64_t(1) << 40;  // 4 TiB of fp32 weights

  FfnKind ffn_kind(int64_t block) const;  // 0-based block
  int64_t moe_expert_hidden() const;      // moe.expert_hidden, or ffn_hidden / top_k when it is 0
  bool has_memory() const { return !memory_placement.empty(); }
  // The configuration of memory layer k (0-based, in placement order): the template with D = d_model,
  // num_layers = n_layers, seed = seed + 1 + k and the sparse-gradient rule applied.
  UltraMemConfig ultramem_layer_config(int64_t k) const;
  PKMConfig pkm_layer_config(int64_t k) const;
  EngramConfig engram_layer_config(int64_t k) const;
  void validate() const;                  // throws std::invalid_argument("ModelConfig.<field>: ...")
};

const char* to_string(FfnKind k);      // "dense" | "moe" | "none"
const char* to_string(MemoryKind k);   // "ultramem" | "pkm"
FfnKind parse_ffn_kind(const std::string& s);      // throws std::invalid_argument
MemoryKind parse_memory_kind(const std::string& s);

// JSON with the same field names; unknown keys and wrong types are errors that name the key path.
ModelConfig model_config_from_json(const nlohmann::json& j);
// The parameter count of a config whose fields are within the bounds above (model_info's total);
// validate() calls it after checking the bounds.
int64_t count_parameters(const ModelConfig& c);
nlohmann::json model_config_to_json(const ModelConfig& c);
// The one model-config reader: a model config file, or a run config {"model": ..., "train": ...}.
// std::runtime_error naming the file for unreadable JSON; std::invalid_argument naming file and field.
ModelConfig load_model_config(const std::string& path);

}  // namespace ultramem::nn
