#include "ultramem/nn/model_config.h"

#include "ultramem/io/json_file.h"

#include <algorithm>
#include <climits>
#include <fstream>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>

#include <nlohmann/json.hpp>

namespace ultramem::nn {
namespace {

using nlohmann::json;

[[noreturn]] void fail(const std::string& field, const std::string& why) {
  throw std::invalid_argument("ModelConfig." + field + ": " + why);
}

std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t");
  if (b == std::string::npos) return "";
  const auto e = s.find_last_not_of(" \t");
  return s.substr(b, e - b + 1);
}

// Parses a whole string as a decimal integer; false when it is not one.
bool parse_int(const std::string& s, int64_t& out) {
  if (s.empty()) return false;
  size_t pos = 0;
  try {
    out = std::stoll(s, &pos);
  } catch (const std::exception&) {
    return false;
  }
  return pos == s.size();
}

// Reads the keys of one JSON object, remembering which were consumed; finish() rejects the rest.
// Every error names the full key path ("memory.ultramem.m_first: ...").
class ObjectReader {
 public:
  ObjectReader(const json& j, std::string path) : j_(j), path_(std::move(path)) {
    if (!j_.is_object())
      throw std::invalid_argument((path_.empty() ? std::string("config") : path_) + ": expected an object, got " +
                                  j_.type_name());
  }

  std::string path_of(const std::string& key) const { return path_.empty() ? key : path_ + "." + key; }

  const json* find(const std::string& key) {
    seen_.insert(key);
    const auto it = j_.find(key);
    return it == j_.end() ? nullptr : &*it;
  }

  void get(const std::string& key, int64_t& out) {
    if (const json* v = find(key)) out = as_int(*v, path_of(key));
  }
  void get(const std::string& key, uint64_t& out) {
    const json* v = find(key);
    if (!v) return;
    if (v->is_number_unsigned()) {
      out = v->get<uint64_t>();
    } else if (v->is_number_integer() && v->get<int64_t>() >= 0) {
      out = static_cast<uint64_t>(v->get<int64_t>());
    } else {
      throw std::invalid_argument(path_of(key) + ": expected a non-negative integer, got " + describe(*v));
    }
  }
  void get(const std::string& key, double& out) {
    const json* v = find(key);
    if (!v) return;
    if (!v->is_number()) throw std::invalid_argument(path_of(key) + ": expected a number, got " + describe(*v));
    out = v->get<double>();
  }
  void get(const std::string& key, bool& out) {
    const json* v = find(key);
    if (!v) return;
    if (!v->is_boolean()) throw std::invalid_argument(path_of(key) + ": expected true or false, got " + describe(*v));
    out = v->get<bool>();
  }
  void get(const std::string& key, std::optional<bool>& out) {
    bool b = false;
    if (find(key) == nullptr) return;
    get(key, b);
    out = b;
  }
  void get(const std::string& key, std::string& out) {
    const json* v = find(key);
    if (!v) return;
    out = as_string(*v, path_of(key));
  }
  // A string key parsed by `parse` (which throws std::invalid_argument with its own message).
  template <typename T, typename Parse>
  void get_enum(const std::string& key, T& out, Parse parse) {
    const json* v = find(key);
    if (!v) return;
    const std::string s = as_string(*v, path_of(key));
    try {
      out = parse(s);
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument(path_of(key) + ": " + strip_field(e.what()));
    }
  }
  // Keys the model fills in itself: a clear error instead of "unknown key".
  void reject(const std::string& key, const std::string& why) {
    if (find(key)) throw std::invalid_argument(path_of(key) + ": " + why);
  }

  void finish() const {
    for (const auto& item : j_.items())
      if (!seen_.count(item.key())) throw std::invalid_argument(path_of(item.key()) + ": unknown key");
  }

  static std::string describe(const json& v) {
    std::string d = v.type_name();
    if (v.is_primitive()) d += " " + v.dump();
    return d;
  }
  static int64_t as_int(const json& v, const std::string& path) {
    if (v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(INT64_MAX))
      throw std::invalid_argument(path + ": integer out of range");
    if (!v.is_number_integer()) throw std::invalid_argument(path + ": expected an integer, got " + describe(v));
    return v.get<int64_t>();
  }
  static std::string as_string(const json& v, const std::string& path) {
    if (!v.is_string()) throw std::invalid_argument(path + ": expected a string, got " + describe(v));
    return v.get<std::string>();
  }
  // "qk_norm: expected ..." -> "expected ..." (the path is prefixed by the caller).
  static std::string strip_field(const std::string& msg) {
    const auto p = msg.find(": ");
    return p == std::string::npos ? msg : msg.substr(p + 2);
  }

 private:
  const json& j_;
  std::string path_;
  std::set<std::string> seen_;
};

PKMConfig::QueryNorm parse_query_norm(const std::string& s) {
  if (s == "batch") return PKMConfig::QueryNorm::Batch;
  if (s == "layer") return PKMConfig::QueryNorm::Layer;
  if (s == "none") return PKMConfig::QueryNorm::None;
  throw std::invalid_argument("query_norm: expected \"batch\", \"layer\" or \"none\", got \"" + s + "\"");
}

const char* query_norm_name(PKMConfig::QueryNorm q) {
  switch (q) {
    case PKMConfig::QueryNorm::Batch: return "batch";
    case PKMConfig::QueryNorm::Layer: return "layer";
    case PKMConfig::QueryNorm::None: return "none";
  }
  return "none";
}

void read_ultramem(const json& j, const std::string& path, UltraMemConfig& c, std::optional<bool>& sparse) {
  ObjectReader r(j, path);
  r.reject("D", "set by the model (d_model)");
  r.reject("num_layers", "set by the model (n_layers)");
  r.reject("seed", "set by the model (seed + 1 + layer index)");
  r.get("n", c.n);
  r.get("E", c.E);
  r.get("Dk", c.Dk);
  r.get("Dv", c.Dv);
  r.get("r", c.r);
  r.get("C", c.C);
  r.get("H", c.H);
  r.get("m", c.m);
  r.get("m_first", c.m_first);
  r.get_enum("filter", c.filter, parse_retrieval_filter);
  r.get("m_neg", c.m_neg);
  r.get("filter_rank", c.filter_rank);
  r.get_enum("qk_norm", c.qk_norm, parse_norm_kind);
  r.get("qk_scale_init", c.qk_scale_init);
  r.get("aux_loss", c.aux_loss);
  r.get("aux_alpha", c.aux_alpha);
  r.get("aux_tau", c.aux_tau);
  r.get_enum("aux_reduction", c.aux_reduction, parse_aux_reduction);
  r.get_enum("value_init", c.value_init, parse_value_init);
  r.get("value_std", c.value_std);
  r.get("track_stats", c.track_stats);
  r.get("stats_window", c.stats_window);
  r.get("retrieval_sample", c.retrieval_sample);
  r.get("permutation_key", c.permutation_key);
  r.get("sparse_value_grad", sparse);
  r.get("query_per_rank", c.query_per_rank);
  r.get("single_projection", c.single_projection);
  r.get("Dp", c.Dp);
  r.get("score_var", c.score_var);
  r.reject("inner_ratio", "set by the model (ffn_hidden / d_model)");
  r.finish();
}

void read_pkm(const json& j, const std::string& path, PKMConfig& c, std::optional<bool>& sparse) {
  ObjectReader r(j, path);
  r.reject("D", "set by the model (d_model)");
  r.reject("seed", "set by the model (seed + 1 + layer index)");
  r.get("n", c.n);
  r.get("Dk", c.Dk);
  r.get("Dv", c.Dv);
  r.get("H", c.H);
  r.get("m", c.m);
  r.get_enum("query_norm", c.query_norm, parse_query_norm);
  r.get("softmax", c.softmax);
  r.get("shared_query", c.shared_query);
  r.get("value_std", c.value_std);
  r.get("sparse_value_grad", sparse);
  r.finish();
}

void read_engram(const json& j, const std::string& path, EngramConfig& c) {
  ObjectReader r(j, path);
  r.reject("D", "set by the model (d_model)");
  r.reject("seed", "set by the model (seed + 1 + layer index)");
  r.get("heads", c.heads);
  r.get("d_e", c.d_e);
  r.get("rows", c.rows);
  r.get("kernel", c.kernel);
  r.get("value_std", c.value_std);
  r.get("conv_std", c.conv_std);
  r.get("sparse_value_grad", c.sparse_value_grad);
  r.finish();
}

void read_moe(const json& j, const std::string& path, MoEConfig& c) {
  ObjectReader r(j, path);
  r.get("num_experts", c.num_experts);
  r.get("top_k", c.top_k);
  r.get("expert_hidden", c.expert_hidden);
  r.get("balance_coef", c.balance_coef);
  r.finish();
}

// Runs a layer config's validate() and re-throws its message under the ModelConfig field.
template <typename Cfg>
void validate_layer(const Cfg& c, const std::string& field) {
  try {
    c.validate();
  } catch (const std::invalid_argument& e) {
    fail(field, e.what());
  }
}

}  // namespace

const char* to_string(FfnKind k) {
  switch (k) {
    case FfnKind::Dense: return "dense";
    case FfnKind::MoE: return "moe";
    case FfnKind::None: return "none";
  }
  return "dense";
}

const char* to_string(MemoryKind k) {
  return k == MemoryKind::UltraMem     ? "ultramem"
         : k == MemoryKind::UltraMemV2 ? "ultramem_v2"
         : k == MemoryKind::Engram     ? "engram"
                                       : "pkm";
}

FfnKind parse_ffn_kind(const std::string& s) {
  if (s == "dense") return FfnKind::Dense;
  if (s == "moe") return FfnKind::MoE;
  if (s == "none") return FfnKind::None;
  throw std::invalid_argument("ffn: expected \"dense\", \"moe\" or \"none\", got \"" + s + "\"");
}

MemoryKind parse_memory_kind(const std::string& s) {
  if (s == "ultramem") return MemoryKind::UltraMem;
  if (s == "pkm") return MemoryKind::PKM;
  if (s == "ultramem_v2") return MemoryKind::UltraMemV2;
  if (s == "engram") return MemoryKind::Engram;
  throw std::invalid_argument("kind: expected \"ultramem\", \"ultramem_v2\", \"pkm\" or \"engram\", got \"" + s + "\"");
}

std::vector<MemoryPlacement> parse_placement(const std::string& s, int64_t n_layers) {
  std::vector<MemoryPlacement> out;
  if (trim(s).empty()) return out;
  std::stringstream ss(s);
  std::string part;
  while (std::getline(ss, part, '/')) {
    const std::string p = trim(part);
    const auto colon = p.find(':');
    MemoryPlacement mp;
    if (colon == std::string::npos || !parse_int(trim(p.substr(0, colon)), mp.read_block) ||
        !parse_int(trim(p.substr(colon + 1)), mp.write_block))
      throw std::invalid_argument("placement \"" + s + "\": part \"" + p +
                                  "\" is not READ:WRITE (1-based block numbers, e.g. \"1:3\")");
    for (int64_t b : {mp.read_block, mp.write_block})
      if (b < 1 || b > n_layers)
        throw std::invalid_argument("placement \"" + s + "\": part \"" + p + "\": block " + std::to_string(b) +
                                    " is outside [1, n_layers=" + std::to_string(n_layers) + "]");
    if (mp.read_block > mp.write_block)
      throw std::invalid_argument("placement \"" + s + "\": part \"" + p +
                                  "\": the read block must not come after the write block");
    out.push_back(mp);
  }
  if (!s.empty() && s.back() == '/') throw std::invalid_argument("placement \"" + s + "\": empty part");
  return out;
}

std::string placement_to_string(const std::vector<MemoryPlacement>& p) {
  std::string s;
  for (size_t i = 0; i < p.size(); ++i) {
    if (i) s += "/";
    s += std::to_string(p[i].read_block) + ":" + std::to_string(p[i].write_block);
  }
  return s;
}

FfnKind ModelConfig::ffn_kind(int64_t block) const {
  if (block < 0 || block >= n_layers)
    throw std::out_of_range("ModelConfig::ffn_kind: block " + std::to_string(block) + " outside [0, " +
                            std::to_string(n_layers) + ")");
  if (ffn.empty()) return FfnKind::Dense;
  if (ffn.size() == 1) return ffn[0];
  return ffn.at(block);
}

int64_t ModelConfig::moe_expert_hidden() const {
  return moe.expert_hidden > 0 ? moe.expert_hidden : ffn_hidden / std::max<int64_t>(1, moe.top_k);
}

UltraMemConfig ModelConfig::ultramem_layer_config(int64_t k) const {
  const bool v2 = memory_kind == MemoryKind::UltraMemV2;
  UltraMemConfig c = v2 ? ultramem_v2 : ultramem;
  c.D = d_model;
  c.num_layers = n_layers;
  c.seed = seed + 1 + static_cast<uint64_t>(k);
  if (v2 && d_model > 0) c.inner_ratio = double(ffn_hidden) / double(d_model);  // k_inner of the V2 init
  // In double: this runs before validate() has bounded n and Dv.
  const auto& sparse = v2 ? ultramem_v2_sparse_value_grad : ultramem_sparse_value_grad;
  c.sparse_value_grad = sparse.value_or(double(c.physical_rows()) * double(c.Dv + c.Dp) >=
                                        double(kSparseValueGradMinEntries));
  return c;
}

EngramConfig ModelConfig::engram_layer_config(int64_t k) const {
  EngramConfig c = engram;
  c.D = d_model;
  c.seed = seed + 1 + static_cast<uint64_t>(k);
  return c;
}

PKMConfig ModelConfig::pkm_layer_config(int64_t k) const {
  PKMConfig c = pkm;
  c.D = d_model;
  c.seed = seed + 1 + static_cast<uint64_t>(k);
  c.sparse_value_grad = pkm_sparse_value_grad.value_or(double(c.n) * double(c.n) * double(c.Dv) >=
                                                       double(kSparseValueGradMinEntries));
  return c;
}

void ModelConfig::validate() const {
  auto positive = [](const char* field, int64_t v) {
    if (v < 1) fail(field, "must be >= 1, got " + std::to_string(v));
  };
  if (vocab_size < 2) fail("vocab_size", "must be >= 2, got " + std::to_string(vocab_size));
  positive("d_model", d_model);
  positive("n_layers", n_layers);
  positive("n_heads", n_heads);
  positive("max_seq_len", max_seq_len);
  positive("ffn_hidden", ffn_hidden);
  // Upper bounds first, so that nothing below loops over or multiplies an absurd size: with these, every
  // parameter count of model_info fits in int64_t, and the total is checked against kMaxParameters.
  auto at_most = [](const char* field, int64_t v, int64_t limit) {
    if (v > limit) fail(field, "must be <= " + std::to_string(limit) + ", got " + std::to_string(v));
  };
  at_most("vocab_size", vocab_size, kMaxVocabSize);
  at_most("d_model", d_model, kMaxWidth);
  at_most("n_layers", n_layers, kMaxLayers);
  at_most("max_seq_len", max_seq_len, kMaxSeqLen);
  at_most("ffn_hidden", ffn_hidden, kMaxHidden);
  at_most("moe.num_experts", moe.num_experts, kMaxExperts);
  at_most("moe.expert_hidden", moe.expert_hidden, kMaxHidden);
  at_most("memory_placement", int64_t(memory_placement.size()), kMaxLayers);
  if (d_model % n_heads != 0)
    fail("n_heads", "must divide d_model = " + std::to_string(d_model) + ", got " + std::to_string(n_heads));
  if ((d_model / n_heads) % 2 != 0)
    fail("n_heads", "head dim d_model / n_heads = " + std::to_string(d_model / n_heads) + " must be even (RoPE)");
  if (!(rope_theta > 0)) fail("rope_theta", "must be > 0");
  if (!(norm_eps > 0)) fail("norm_eps", "must be > 0");
  if (!(init_std > 0)) fail("init_std", "must be > 0");
  if (!(dropout >= 0 && dropout < 1)) fail("dropout", "must be in [0, 1), got " + std::to_string(dropout));
  if (!(ffn.empty() || ffn.size() == 1 || int64_t(ffn.size()) == n_layers))
    fail("ffn", "must have 1 or n_layers = " + std::to_string(n_layers) + " entries, got " +
                    std::to_string(ffn.size()));
  bool any_moe = false;
  for (int64_t b = 0; b < n_layers; ++b) any_moe |= ffn_kind(b) == FfnKind::MoE;
  if (any_moe) {
    positive("moe.num_experts", moe.num_experts);
    if (moe.top_k < 1 || moe.top_k > moe.num_experts)
      fail("moe.top_k", "must be in [1, num_experts = " + std::to_string(moe.num_experts) + "], got " +
                            std::to_string(moe.top_k));
    if (moe.expert_hidden < 0) fail("moe.expert_hidden", "must be >= 0 (0 means ffn_hidden / top_k)");
    if (moe_expert_hidden() < 1) fail("moe.expert_hidden", "ffn_hidden / top_k is 0; set expert_hidden");
    if (!(moe.balance_coef >= 0)) fail("moe.balance_coef", "must be >= 0");
  }
  for (size_t k = 0; k < memory_placement.size(); ++k) {
    const auto& p = memory_placement[k];
    const std::string field = "memory_placement[" + std::to_string(k) + "]";
    for (int64_t b : {p.read_block, p.write_block})
      if (b < 1 || b > n_layers)
        fail(field, "block " + std::to_string(b) + " is outside [1, n_layers=" + std::to_string(n_layers) + "]");
    if (p.read_block > p.write_block)
      fail(field, "read_block " + std::to_string(p.read_block) + " comes after write_block " +
                      std::to_string(p.write_block));
  }
  if (has_memory()) {
    if (is_ultramem(memory_kind))
      validate_layer(ultramem_layer_config(0), to_string(memory_kind));
    else if (memory_kind == MemoryKind::Engram)
      validate_layer(engram_layer_config(0), "engram");
    else
      validate_layer(pkm_layer_config(0), "pkm");
  }
  const int64_t params = count_parameters(*this);
  if (params > kMaxParameters)
    fail("size", "the model would have " + std::to_string(params) + " parameters (" +
                     std::to_string(params / (int64_t(1) << 28)) + " GiB in fp32); the limit is " +
                     std::to_string(kMaxParameters));
}

ModelConfig model_config_from_json(const json& j) {
  ModelConfig c;
  ObjectReader r(j, "");
  r.get("name", c.name);
  r.get("vocab_size", c.vocab_size);
  r.get("d_model", c.d_model);
  r.get("n_layers", c.n_layers);
  r.get("n_heads", c.n_heads);
  r.get("max_seq_len", c.max_seq_len);
  r.get("ffn_hidden", c.ffn_hidden);
  r.get("rope_theta", c.rope_theta);
  r.get("norm_eps", c.norm_eps);
  r.get("init_std", c.init_std);
  r.get("dropout", c.dropout);
  r.get("tie_embeddings", c.tie_embeddings);
  r.get("seed", c.seed);
  if (const json* f = r.find("ffn")) {
    auto one = [](const json& v, const std::string& path) {
      const std::string s = ObjectReader::as_string(v, path);
      try {
        return parse_ffn_kind(s);
      } catch (const std::invalid_argument& e) {
        throw std::invalid_argument(path + ": " + ObjectReader::strip_field(e.what()));
      }
    };
    if (f->is_array()) {
      for (size_t i = 0; i < f->size(); ++i) c.ffn.push_back(one((*f)[i], "ffn[" + std::to_string(i) + "]"));
    } else if (f->is_string()) {
      c.ffn = {one(*f, "ffn")};
    } else {
      throw std::invalid_argument("ffn: expected a string (\"dense\", \"moe\", \"none\") or an array of them, got " +
                                  ObjectReader::describe(*f));
    }
  }
  if (const json* m = r.find("moe")) read_moe(*m, "moe", c.moe);
  if (const json* m = r.find("memory")) {
    ObjectReader mr(*m, "memory");
    mr.get_enum("kind", c.memory_kind, parse_memory_kind);
    std::string placement;
    mr.get("placement", placement);
    if (const json* u = mr.find("ultramem")) read_ultramem(*u, "memory.ultramem", c.ultramem, c.ultramem_sparse_value_grad);
    if (const json* u = mr.find("ultramem_v2")) {
      read_ultramem(*u, "memory.ultramem_v2", c.ultramem_v2, c.ultramem_v2_sparse_value_grad);
      // The pre-values keep the paper's Dp : Dv = 1 : 3 for the template's Dv unless Dp is given.
      if (!u->contains("Dp")) c.ultramem_v2.Dp = std::max<int64_t>(1, c.ultramem_v2.Dv / 3);
    }
    if (const json* p = mr.find("pkm")) read_pkm(*p, "memory.pkm", c.pkm, c.pkm_sparse_value_grad);
    if (const json* e = mr.find("engram")) read_engram(*e, "memory.engram", c.engram);
    mr.finish();
    if (c.n_layers < 1) fail("n_layers", "must be >= 1, got " + std::to_string(c.n_layers));
    try {
      c.memory_placement = parse_placement(placement, c.n_layers);
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument(std::string("memory.placement: ") + e.what());
    }
  }
  r.finish();
  c.validate();
  return c;
}

// An UltraMem template as JSON. The fields added after V1 (filter_rank, permutation_key, the V2 switches) are
// written only when set (all of them for the V2 template), so that older configs and records stay as they were.
static json ultramem_template_json(const UltraMemConfig& u, const std::optional<bool>& sparse, bool v2) {
  json uj = {{"n", u.n},
             {"E", u.E},
             {"Dk", u.Dk},
             {"Dv", u.Dv},
             {"r", u.r},
             {"C", u.C},
             {"H", u.H},
             {"m", u.m},
             {"m_first", u.m_first},
             {"filter", to_string(u.filter)},
             {"m_neg", u.m_neg},
             {"qk_norm", to_string(u.qk_norm)},
             {"qk_scale_init", u.qk_scale_init},
             {"aux_loss", u.aux_loss},
             {"aux_alpha", u.aux_alpha},
             {"aux_tau", u.aux_tau},
             {"aux_reduction", to_string(u.aux_reduction)},
             {"value_init", to_string(u.value_init)},
             {"value_std", u.value_std},
             {"track_stats", u.track_stats},
             {"stats_window", u.stats_window},
             {"retrieval_sample", u.retrieval_sample}};
  // Written only for the rank_r filter, so the configs of the other filters (and the records of runs
  // made before it existed) stay as they were.
  if (u.filter == RetrievalFilter::kRankR) uj["filter_rank"] = u.filter_rank;
  if (u.permutation_key != 0) uj["permutation_key"] = u.permutation_key;  // likewise: only when set
  if (sparse) uj["sparse_value_grad"] = *sparse;
  if (v2 || u.query_per_rank) uj["query_per_rank"] = u.query_per_rank;
  if (v2 || u.single_projection) uj["single_projection"] = u.single_projection;
  if (v2 || u.Dp != 0) uj["Dp"] = u.Dp;
  if (v2 || u.value_init == ValueInit::V2) uj["score_var"] = u.score_var;
  return uj;
}

json model_config_to_json(const ModelConfig& c) {
  json j;
  j["name"] = c.name;
  j["vocab_size"] = c.vocab_size;
  j["d_model"] = c.d_model;
  j["n_layers"] = c.n_layers;
  j["n_heads"] = c.n_heads;
  j["max_seq_len"] = c.max_seq_len;
  j["ffn_hidden"] = c.ffn_hidden;
  j["rope_theta"] = c.rope_theta;
  j["norm_eps"] = c.norm_eps;
  j["init_std"] = c.init_std;
  j["dropout"] = c.dropout;
  j["tie_embeddings"] = c.tie_embeddings;
  j["seed"] = c.seed;
  bool uniform = true;
  for (const auto k : c.ffn) uniform &= k == c.ffn.front();
  if (c.ffn.empty()) {
    j["ffn"] = "dense";
  } else if (uniform && (c.ffn.size() == 1 || int64_t(c.ffn.size()) == c.n_layers)) {
    j["ffn"] = to_string(c.ffn.front());
  } else {
    json arr = json::array();
    for (const auto k : c.ffn) arr.push_back(to_string(k));
    j["ffn"] = arr;
  }
  j["moe"] = {{"num_experts", c.moe.num_experts},
              {"top_k", c.moe.top_k},
              {"expert_hidden", c.moe.expert_hidden},
              {"balance_coef", c.moe.balance_coef}};
  const json uj = ultramem_template_json(c.ultramem, c.ultramem_sparse_value_grad, false);
  const auto& p = c.pkm;
  json pj = {{"n", p.n},
             {"Dk", p.Dk},
             {"Dv", p.Dv},
             {"H", p.H},
             {"m", p.m},
             {"query_norm", query_norm_name(p.query_norm)},
             {"softmax", p.softmax},
             {"shared_query", p.shared_query},
             {"value_std", p.value_std}};
  if (c.pkm_sparse_value_grad) pj["sparse_value_grad"] = *c.pkm_sparse_value_grad;
  j["memory"] = {{"kind", to_string(c.memory_kind)},
                 {"placement", placement_to_string(c.memory_placement)},
                 {"ultramem", uj},
                 {"pkm", pj}};
  // Only for the V2 kind: the configs of the other kinds (and the records of older runs) stay as they were.
  if (c.memory_kind == MemoryKind::UltraMemV2)
    j["memory"]["ultramem_v2"] = ultramem_template_json(c.ultramem_v2, c.ultramem_v2_sparse_value_grad, true);
  if (c.memory_kind == MemoryKind::Engram)  // likewise only for its kind
    j["memory"]["engram"] = {{"heads", c.engram.heads},         {"d_e", c.engram.d_e},
                             {"rows", c.engram.rows},           {"kernel", c.engram.kernel},
                             {"value_std", c.engram.value_std}, {"conv_std", c.engram.conv_std},
                             {"sparse_value_grad", c.engram.sparse_value_grad}};
  return j;
}

ModelConfig load_model_config(const std::string& path) {
  json j = io::read_json_file(path);
  // A run config {"model": {...}, "train": {...}} holds the model config under "model".
  if (j.is_object() && j.contains("model")) {
    if (!j["model"].is_object())
      throw std::invalid_argument(path + ": model: expected an object, got " + std::string(j["model"].type_name()));
    j = j["model"];
  }
  try {
    return model_config_from_json(j);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(path + ": " + e.what());
  }
}

}  // namespace ultramem::nn
