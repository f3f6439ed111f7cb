// Tests of the language model: shapes, causality, KV-cache decoding, memory placement, parameter
// groups, config JSON, MoE routing and balance loss, double-precision gradients of every parameter,
// model_info hand counts, telemetry, input validation, and short training runs of every kind; the
// shipped configs/tiny-*.json as they are on disk; the UltraMem first-stage rule (m_first vs m).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <chrono>
#include <cmath>
#include <limits>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <stdexcept>
#include <string>

#include <nlohmann/json.hpp>

#include "grad_check.h"
#include "ultramem/nn/model_config.h"
#include "ultramem/nn/model_info.h"
#include "ultramem/nn/moe.h"
#include "ultramem/nn/swiglu.h"
#include "ultramem/nn/transformer.h"
#include "ultramem/nn/ultramem.h"

using nlohmann::json;
using namespace ultramem::nn;
using ultramem::testing::expect_grad_matches;

namespace {

const std::vector<std::string> kTiny = {"tiny-dense", "tiny-moe", "tiny-pkm", "tiny-ultramem", "tiny-ultramemv2",
                                         "tiny-engram"};

// configs/<name>.json as shipped: vocab 8192 and max_seq_len 128, so that `ultramem train` runs it on the
// default prepared data (`ultramem prepare`, --vocab 8192) at its default seq_len 128.
ModelConfig shipped(const std::string& name) {
  return load_model_config(std::string(ULTRAMEM_CONFIG_DIR) + "/" + name + ".json");
}

// The shipped config at test size: vocab 64 and max_seq_len 32. With d_model 32 an 8192-way output head
// would dominate the forward, backward and training tests below; these also write token ids, logit
// shapes and cache limits for this size. Everything else is the shipped config.
ModelConfig tiny(const std::string& name) {
  ModelConfig c = shipped(name);
  c.vocab_size = 64;
  c.max_seq_len = 32;
  return c;
}

// Random tokens [B, T] in [0, vocab).
torch::Tensor random_tokens(int64_t B, int64_t T, int64_t vocab, uint64_t seed) {
  torch::manual_seed(seed);
  return torch::randint(0, vocab, {B, T}, torch::kLong);
}

// Runs fn and expects exception E whose message contains `needle`.
template <typename E>
void expect_throw_with(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "expected an exception containing \"" << needle << "\"";
  } catch (const E& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
        << "message \"" << e.what() << "\" lacks \"" << needle << "\"";
  }
}

torch::Tensor param(Transformer& model, const std::string& name) {
  for (const auto& p : model->named_parameters())
    if (p.key() == name) return p.value();
  ADD_FAILURE() << "no parameter " << name;
  return {};
}

double max_abs_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a - b).abs().max().item<double>();
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Shapes, causality, KV cache

TEST(Model, ForwardShapesAndFiniteLogits) {
  for (const auto& name : kTiny) {
    Transformer model(tiny(name));
    const auto tokens = random_tokens(3, 17, 64, 1);
    const auto logits = model->forward(tokens);
    EXPECT_EQ(logits.sizes(), (std::vector<int64_t>{3, 17, 64})) << name;
    EXPECT_TRUE(torch::isfinite(logits).all().item<bool>()) << name;
    const auto res = model->residual_stream(tokens);
    ASSERT_EQ(int64_t(res.size()), model->config().n_layers + 1) << name;
    EXPECT_EQ(res.back().sizes(), (std::vector<int64_t>{3, 17, 32})) << name;
  }
}

TEST(Model, ChangingAFutureTokenLeavesEarlierLogitsUnchanged) {
  for (const auto& name : kTiny) {
    Transformer model(tiny(name));
    auto tokens = random_tokens(2, 16, 64, 2);
    const auto before = model->forward(tokens);
    auto changed = tokens.clone();
    changed.index_put_({torch::indexing::Slice(), 9}, (tokens.select(1, 9) + 7) % 64);
    const auto after = model->forward(changed);
    const auto early = torch::indexing::Slice(0, 9), late = torch::indexing::Slice(9, 16);
    EXPECT_LE(max_abs_diff(before.index({torch::indexing::Slice(), early}), after.index({torch::indexing::Slice(), early})),
              1e-6)
        << name;
    EXPECT_GT(max_abs_diff(before.index({torch::indexing::Slice(), late}), after.index({torch::indexing::Slice(), late})),
              1e-4)
        << name << ": the changed token must affect its own and later positions";
  }
}

TEST(Model, KVCacheDecodingMatchesFullForward) {
  for (const auto& name : kTiny) {
    Transformer model(tiny(name));
    model->eval();
    torch::NoGradGuard ng;
    const int64_t T = 14;
    const auto tokens = random_tokens(2, T, 64, 3);
    const auto full = model->forward(tokens);
    auto cache = model->make_cache(2, 20);
    std::vector<torch::Tensor> parts;
    parts.push_back(model->forward_cached(tokens.narrow(1, 0, 5), cache));  // prompt
    for (int64_t t = 5; t < 9; ++t) parts.push_back(model->forward_cached(tokens.narrow(1, t, 1), cache));
    parts.push_back(model->forward_cached(tokens.narrow(1, 9, 3), cache));  // a chunk
    for (int64_t t = 12; t < T; ++t) parts.push_back(model->forward_cached(tokens.narrow(1, t, 1), cache));
    EXPECT_EQ(cache.length, T) << name;
    const auto inc = torch::cat(parts, 1);
    ASSERT_EQ(inc.sizes(), full.sizes()) << name;
    EXPECT_LE(max_abs_diff(inc, full), 2e-5) << name;
  }
}

TEST(Model, DecodingUnderInferenceModeMatchesNoGrad) {
  for (const auto& name : kTiny) {
    Transformer model(tiny(name));
    model->eval();
    const auto tokens = random_tokens(1, 6, 64, 21);
    torch::Tensor a, b;
    {
      torch::NoGradGuard ng;
      auto cache = model->make_cache(1, 8);
      model->forward_cached(tokens.narrow(1, 0, 5), cache);
      a = model->forward_cached(tokens.narrow(1, 5, 1), cache);
    }
    {
      c10::InferenceMode im;
      auto cache = model->make_cache(1, 8);
      model->forward_cached(tokens.narrow(1, 0, 5), cache);
      b = model->forward_cached(tokens.narrow(1, 5, 1), cache);
    }
    EXPECT_EQ(max_abs_diff(a, b), 0.0) << name;
  }
}

TEST(Model, KVCacheLimitsAreClearErrors) {
  Transformer model(tiny("tiny-dense"));
  torch::NoGradGuard ng;
  expect_throw_with<std::invalid_argument>([&] { model->make_cache(1, 33); }, "max_seq_len");
  auto cache = model->make_cache(1, 6);
  model->forward_cached(random_tokens(1, 4, 64, 4), cache);
  expect_throw_with<std::invalid_argument>([&] { model->forward_cached(random_tokens(1, 3, 64, 5), cache); },
                                           "positions left in the cache");
  model->forward_cached(random_tokens(1, 2, 64, 6), cache);
  expect_throw_with<std::invalid_argument>([&] { model->forward_cached(random_tokens(1, 1, 64, 7), cache); },
                                           "cache is full");
  auto other = model->make_cache(2, 6);
  expect_throw_with<std::invalid_argument>([&] { model->forward_cached(random_tokens(1, 1, 64, 8), other); },
                                           "batch");
  // A full-length cache still stops at max_seq_len.
  auto longest = model->make_cache(1, 32);
  model->forward_cached(random_tokens(1, 32, 64, 9), longest);
  expect_throw_with<std::invalid_argument>([&] { model->forward_cached(random_tokens(1, 1, 64, 10), longest); },
                                           "max_seq_len 32");
}

TEST(Model, InputValidationNamesTheProblem) {
  Transformer model(tiny("tiny-dense"));
  expect_throw_with<std::invalid_argument>([&] { model->forward(torch::zeros({1, 4}, torch::kInt)); }, "int64");
  expect_throw_with<std::invalid_argument>([&] { model->forward(torch::zeros({4}, torch::kLong)); }, "[B, T]");
  auto bad = torch::zeros({2, 5}, torch::kLong);
  bad[1][3] = 64;
  expect_throw_with<std::invalid_argument>([&] { model->forward(bad); }, "token id 64 at [1, 3]");
  bad[1][3] = -2;
  expect_throw_with<std::invalid_argument>([&] { model->forward(bad); }, "token id -2");
  expect_throw_with<std::invalid_argument>([&] { model->forward(torch::zeros({1, 33}, torch::kLong)); },
                                           "max_seq_len");
}

// ---------------------------------------------------------------------------------------------
// Memory placement: the memory output enters the residual stream after its write block only.

TEST(Model, MemoryWritesAfterItsWriteBlockOnly) {
  for (const auto kind : {MemoryKind::UltraMem, MemoryKind::PKM}) {
    ModelConfig c = tiny(kind == MemoryKind::UltraMem ? "tiny-ultramem" : "tiny-pkm");
    c.n_layers = 4;
    c.ffn = {FfnKind::Dense};
    c.pkm.Dv = 16;  // so PKM has an output projection too
    c.memory_placement = parse_placement("2:3", 4);
    ModelConfig plain = c;
    plain.memory_placement.clear();
    Transformer with_mem(c), without(plain);
    const auto tokens = random_tokens(2, 10, 64, 11);
    const auto a = with_mem->residual_stream(tokens), b = without->residual_stream(tokens);
    ASSERT_EQ(a.size(), 5u);
    for (size_t i = 0; i <= 2; ++i)  // embedding, after block 1, after block 2
      EXPECT_EQ(max_abs_diff(a[i], b[i]), 0.0) << to_string(kind) << " residual " << i;
    for (size_t i = 3; i <= 4; ++i)  // after block 3 (the write) and block 4
      EXPECT_GT(max_abs_diff(a[i], b[i]), 1e-5) << to_string(kind) << " residual " << i;
    {
      torch::NoGradGuard ng;
      param(with_mem, "memories.0.wo").zero_();
    }
    EXPECT_EQ(max_abs_diff(with_mem->forward(tokens), without->forward(tokens)), 0.0) << to_string(kind);
  }
}

TEST(Model, ParallelMemoryAddsAfterTheSameBlock) {
  ModelConfig c = tiny("tiny-ultramem");
  c.memory_placement = parse_placement("2:2", 3);
  ModelConfig plain = c;
  plain.memory_placement.clear();
  Transformer with_mem(c), without(plain);
  const auto tokens = random_tokens(1, 8, 64, 12);
  const auto a = with_mem->residual_stream(tokens), b = without->residual_stream(tokens);
  EXPECT_EQ(max_abs_diff(a[1], b[1]), 0.0);
  EXPECT_GT(max_abs_diff(a[2], b[2]), 1e-5);
}

// ---------------------------------------------------------------------------------------------
// Parameter groups

TEST(Model, ParamGroupsPartitionTheParameters) {
  for (const auto& name : kTiny) {
    Transformer model(tiny(name));
    const auto g = model->param_groups();
    std::map<const void*, int> seen;
    for (const auto* group : {&g.decay, &g.no_decay, &g.memory_values, &g.experts})
      for (const auto& p : *group) ++seen[p.unsafeGetTensorImpl()];
    const auto named = model->named_parameters();
    EXPECT_EQ(seen.size(), named.size()) << name;
    std::set<const void*> decay, no_decay, values;
    for (const auto& p : g.decay) decay.insert(p.unsafeGetTensorImpl());
    for (const auto& p : g.no_decay) no_decay.insert(p.unsafeGetTensorImpl());
    for (const auto& p : g.memory_values) values.insert(p.unsafeGetTensorImpl());
    std::set<const void*> experts;
    for (const auto& p : g.experts) experts.insert(p.unsafeGetTensorImpl());
    EXPECT_EQ(g.experts.size(), name == "tiny-moe" ? 4u : 0u) << name;  // w_in, w_out of its 2 MoE blocks
    for (const auto& p : named) {
      const void* key = p.value().unsafeGetTensorImpl();
      EXPECT_EQ(seen[key], 1) << name << ": " << p.key() << " must be in exactly one group";
      const std::string& n = p.key();
      const auto ends = [&](const std::string& s) {
        return n.size() >= s.size() && n.compare(n.size() - s.size(), s.size(), s) == 0;
      };
      if (ends(".values")) EXPECT_TRUE(values.count(key)) << name << ": " << n;
      if (ends("norm.weight") || ends(".cores") || ends("_scale")) EXPECT_TRUE(no_decay.count(key)) << name << ": " << n;
      if (ends("wqkv") || ends("embedding") || ends("router") || ends(".keys") || ends(".wq"))
        EXPECT_TRUE(decay.count(key)) << name << ": " << n;
      if (ends(".pre_values")) EXPECT_TRUE(values.count(key)) << name << ": " << n;
      if (ends(".moe.w_in") || ends(".moe.w_out")) EXPECT_TRUE(experts.count(key)) << name << ": " << n;
    }
    // One table per memory; UltraMemV2's pre-values train with them.
    const size_t tables =
        name == "tiny-ultramemv2" ? 2 : name == "tiny-pkm" || name == "tiny-ultramem" || name == "tiny-engram" ? 1 : 0;
    EXPECT_EQ(g.memory_values.size(), tables * model->config().memory_placement.size()) << name;
  }
}

// ---------------------------------------------------------------------------------------------
// Config JSON

TEST(ModelConfigJson, UnknownKeysNameTheirPath) {
  const json base = model_config_to_json(shipped("tiny-ultramem"));
  auto with = [&](const std::function<void(json&)>& edit) {
    json j = base;
    edit(j);
    return j;
  };
  expect_throw_with<std::invalid_argument>([&] { model_config_from_json(with([](json& j) { j["d_modle"] = 3; })); },
                                           "d_modle: unknown key");
  expect_throw_with<std::invalid_argument>(
      [&] { model_config_from_json(with([](json& j) { j["memory"]["ultramem"]["mfirst"] = 3; })); },
      "memory.ultramem.mfirst: unknown key");
  expect_throw_with<std::invalid_argument>(
      [&] { model_config_from_json(with([](json& j) { j["memory"]["pkm"]["heads"] = 3; })); },
      "memory.pkm.heads: unknown key");
  expect_throw_with<std::invalid_argument>([&] { model_config_from_json(with([](json& j) { j["moe"]["topk"] = 1; })); },
                                           "moe.topk: unknown key");
  expect_throw_with<std::invalid_argument>(
      [&] { model_config_from_json(with([](json& j) { j["memory"]["where"] = "1:2"; })); },
      "memory.where: unknown key");
  expect_throw_with<std::invalid_argument>(
      [&] { model_config_from_json(with([](json& j) { j["memory"]["ultramem"]["D"] = 16; })); },
      "memory.ultramem.D: set by the model");
}

TEST(ModelConfigJson, WrongTypesNameTheirPath) {
  const json base = model_config_to_json(shipped("tiny-moe"));
  auto with = [&](const std::function<void(json&)>& edit) {
    json j = base;
    edit(j);
    return j;
  };
  expect_throw_with<std::invalid_argument>([&] { model_config_from_json(with([](json& j) { j["d_model"] = "32"; })); },
                                           "d_model: expected an integer");
  expect_throw_with<std::invalid_argument>([&] { model_config_from_json(with([](json& j) { j["d_model"] = 32.5; })); },
                                           "d_model: expected an integer");
  expect_throw_with<std::invalid_argument>(
      [&] { model_config_from_json(with([](json& j) { j["tie_embeddings"] = 1; })); }, "tie_embeddings: expected true");
  expect_throw_with<std::invalid_argument>([&] { model_config_from_json(with([](json& j) { j["ffn"] = 3; })); },
                                           "ffn: expected a string");
  expect_throw_with<std::invalid_argument>(
      [&] { model_config_from_json(with([](json& j) { j["ffn"] = json::array({"dense", "sparse", "moe"}); })); },
      "ffn[1]: expected \"dense\"");
  expect_throw_with<std::invalid_argument>(
      [&] { model_config_from_json(with([](json& j) { j["memory"]["kind"] = "hash"; })); }, "memory.kind: expected");
  expect_throw_with<std::invalid_argument>(
      [&] { model_config_from_json(with([](json& j) { j["memory"]["ultramem"]["qk_norm"] = "batch"; })); },
      "memory.ultramem.qk_norm: expected \"rms\" or \"layer\"");
  expect_throw_with<std::invalid_argument>(
      [&] { model_config_from_json(with([](json& j) { j["moe"]["balance_coef"] = "high"; })); },
      "moe.balance_coef: expected a number");
  expect_throw_with<std::invalid_argument>([&] { model_config_from_json(with([](json& j) { j["moe"] = 4; })); },
                                           "moe: expected an object");
  expect_throw_with<std::invalid_argument>([&] { model_config_from_json(with([](json& j) { j["seed"] = -1; })); },
                                           "seed: expected a non-negative integer");
}

// Issue 16: sizes have upper bounds checked before anything loops over or multiplies them. A config with
// n_layers 2^63-1 used to hang (validate looped over every layer), E = 2^62 hung in sqrt_E(), E = 0 divided
// by zero, ffn_hidden 2^63-1 passed and model_info printed a wrapped count.
TEST(ModelConfigJson, AbsurdSizesAreRefusedQuicklyNamingTheField) {
  const json base = model_config_to_json(shipped("tiny-ultramem"));
  auto with = [&](const std::function<void(json&)>& edit) {
    json j = base;
    edit(j);
    return j;
  };
  const int64_t huge = std::numeric_limits<int64_t>::max();
  const auto start = std::chrono::steady_clock::now();
  expect_throw_with<std::invalid_argument>([&] { model_config_from_json(with([&](json& j) { j["n_layers"] = huge; })); },
                                           "ModelConfig.n_layers: must be <= 1024");
  expect_throw_with<std::invalid_argument>(
      [&] { model_config_from_json(with([&](json& j) { j["ffn_hidden"] = huge; })); }, "ModelConfig.ffn_hidden");
  expect_throw_with<std::invalid_argument>(
      [&] { model_config_from_json(with([&](json& j) { j["d_model"] = int64_t(1) << 40; })); }, "ModelConfig.d_model");
  expect_throw_with<std::invalid_argument>(
      [&] { model_config_from_json(with([&](json& j) { j["max_seq_len"] = huge; })); }, "ModelConfig.max_seq_len");
  expect_throw_with<std::invalid_argument>(
      [&] { model_config_from_json(with([&](json& j) { j["memory"]["ultramem"]["E"] = int64_t(1) << 62; })); },
      "UltraMemConfig.E: must be <=");
  expect_throw_with<std::invalid_argument>(
      [&] { model_config_from_json(with([&](json& j) { j["memory"]["ultramem"]["E"] = 0; })); },
      "UltraMemConfig.E: must be >= 1");
  expect_throw_with<std::invalid_argument>(
      [&] { model_config_from_json(with([&](json& j) { j["memory"]["ultramem"]["Dv"] = huge; })); },
      "UltraMemConfig.Dv");
  expect_throw_with<std::invalid_argument>(
      [&] {
        model_config_from_json(with([&](json& j) {
          j["ffn"] = "moe";
          j["moe"]["num_experts"] = huge;
        }));
      },
      "ModelConfig.moe.num_experts");
  // Every field within its bound, the whole over 2^40 parameters: refused with the count.
  expect_throw_with<std::invalid_argument>(
      [&] {
        model_config_from_json(with([&](json& j) {
          j["vocab_size"] = ModelConfig::kMaxVocabSize;
          j["d_model"] = ModelConfig::kMaxWidth;
          j["n_heads"] = 512;
        }));
      },
      "ModelConfig.size: the model would have");
  // Bounds checks, not loops: all of the above in well under the seconds a loop over 2^63 would take.
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 30.0);
  // The largest sizes the bounds allow still count their parameters without wrapping.
  ModelConfig big = shipped("tiny-dense");
  big.n_layers = ModelConfig::kMaxLayers;
  big.d_model = 4096;
  big.n_heads = 32;
  big.ffn_hidden = ModelConfig::kMaxHidden;
  big.ffn = {FfnKind::Dense};
  const int64_t ffn_params = int64_t(3) * 4096 * ModelConfig::kMaxHidden * 1024;  // 1.3e13
  EXPECT_GT(count_parameters(big), ffn_params);
  EXPECT_LT(count_parameters(big), ffn_params + (int64_t(1) << 40));
  expect_throw_with<std::invalid_argument>([&] { big.validate(); }, "ModelConfig.size");
}

// A config that is valid but whose training would not fit in this machine's memory is refused with the
// size it would need; a small one passes.
TEST(ModelConfigJson, ModelsThatDoNotFitInMemoryAreRefusedWithTheSize) {
  ModelConfig big = shipped("tiny-dense");
  big.n_layers = 512;
  big.d_model = 8192;
  big.n_heads = 64;
  big.ffn_hidden = 32768;
  const ModelInfo info = model_info(big);  // ~0.5 T parameters: valid, far beyond any machine this runs on
  expect_throw_with<std::invalid_argument>(
      [&] { check_fits_in_memory("training big", training_memory(big, info, 8, 128)); },
      "training big needs about");
  expect_throw_with<std::invalid_argument>(
      [&] { check_fits_in_memory("training big", training_memory(big, info, 8, 128)); }, "of memory and swap");
  const ModelConfig tiny = shipped("tiny-dense");
  EXPECT_NO_THROW(check_fits_in_memory("training tiny", training_memory(tiny, model_info(tiny), 8, 128)));
  // Activations grow with the batch: a tiny model at an absurd batch is refused too.
  const MemoryNeed wide = training_memory(tiny, model_info(tiny), 1 << 20, 1 << 12);
  EXPECT_GT(wide.activations, 1e13);
  expect_throw_with<std::invalid_argument>([&] { check_fits_in_memory("training tiny", wide); }, "of activations");
}

TEST(ModelConfigJson, InvalidValuesNameTheField) {
  const json base = model_config_to_json(shipped("tiny-ultramem"));
  auto with = [&](const std::function<void(json&)>& edit) {
    json j = base;
    edit(j);
    return j;
  };
  expect_throw_with<std::invalid_argument>([&] { model_config_from_json(with([](json& j) { j["n_heads"] = 3; })); },
                                           "ModelConfig.n_heads: must divide d_model");
  expect_throw_with<std::invalid_argument>([&] { model_config_from_json(with([](json& j) { j["n_heads"] = 32; })); },
                                           "must be even");
  expect_throw_with<std::invalid_argument>([&] { model_config_from_json(with([](json& j) { j["vocab_size"] = 1; })); },
                                           "ModelConfig.vocab_size");
  expect_throw_with<std::invalid_argument>([&] { model_config_from_json(with([](json& j) { j["dropout"] = 1.0; })); },
                                           "ModelConfig.dropout");
  expect_throw_with<std::invalid_argument>(
      [&] { model_config_from_json(with([](json& j) { j["memory"]["placement"] = "3:2"; })); },
      "memory.placement");
  expect_throw_with<std::invalid_argument>(
      [&] { model_config_from_json(with([](json& j) { j["memory"]["placement"] = "1:4"; })); },
      "block 4 is outside [1, n_layers=3]");
  expect_throw_with<std::invalid_argument>(
      [&] { model_config_from_json(with([](json& j) { j["memory"]["placement"] = "1-2"; })); }, "READ:WRITE");
  expect_throw_with<std::invalid_argument>(
      [&] { model_config_from_json(with([](json& j) { j["memory"]["ultramem"]["m_first"] = 9; })); },
      "ModelConfig.ultramem: UltraMemConfig.m_first");
  expect_throw_with<std::invalid_argument>(
      [&] { model_config_from_json(with([](json& j) { j["ffn"] = json::array({"dense", "moe"}); })); },
      "ModelConfig.ffn: must have 1 or n_layers");
  expect_throw_with<std::invalid_argument>(
      [&] {
        model_config_from_json(with([](json& j) {
          j["ffn"] = "moe";
          j["moe"]["top_k"] = 9;
        }));
      },
      "ModelConfig.moe.top_k");
  ModelConfig c = tiny("tiny-dense");
  c.memory_placement = {MemoryPlacement{2, 1}};
  expect_throw_with<std::invalid_argument>([&] { c.validate(); }, "ModelConfig.memory_placement[0]");
  expect_throw_with<std::runtime_error>([] { load_model_config("/nonexistent/model.json"); }, "/nonexistent/model.json");
}

TEST(ModelConfigJson, RoundTrips) {
  std::vector<ModelConfig> configs;
  for (const auto& name : kTiny) configs.push_back(shipped(name));
  ModelConfig c = shipped("tiny-ultramem");
  c.ffn = {FfnKind::None, FfnKind::MoE, FfnKind::Dense};
  c.tie_embeddings = false;
  c.ultramem_sparse_value_grad = true;
  c.pkm_sparse_value_grad = false;
  c.ultramem.qk_norm = NormKind::Layer;
  c.ultramem.value_init = ValueInit::Fixed;
  c.pkm.query_norm = PKMConfig::QueryNorm::None;
  c.seed = 123456789012345ULL;
  c.rope_theta = 500000.0;
  configs.push_back(c);
  for (const auto& cfg : configs) {
    const json j = model_config_to_json(cfg);
    const ModelConfig back = model_config_from_json(json::parse(j.dump()));
    EXPECT_EQ(model_config_to_json(back), j) << cfg.name;
    EXPECT_EQ(placement_to_string(back.memory_placement), placement_to_string(cfg.memory_placement));
    for (int64_t b = 0; b < cfg.n_layers; ++b) EXPECT_EQ(back.ffn_kind(b), cfg.ffn_kind(b));
  }
  const ModelConfig back = model_config_from_json(model_config_to_json(c));
  EXPECT_EQ(back.ultramem_sparse_value_grad, std::optional<bool>(true));
  EXPECT_EQ(back.pkm_sparse_value_grad, std::optional<bool>(false));
  EXPECT_EQ(back.seed, c.seed);
  EXPECT_EQ(back.ultramem.value_init, ValueInit::Fixed);
  EXPECT_FALSE(back.tie_embeddings);
}

TEST(ModelConfigJson, SparseValueGradRuleAndPerLayerSeeds) {
  ModelConfig c = tiny("tiny-ultramem");
  EXPECT_FALSE(c.ultramem_layer_config(0).sparse_value_grad);  // 16 rows x 16: small
  c.ultramem.n = 2048;                                          // N = 2048^2 / 4 = 1M rows x 16 = 2^24 entries
  c.ultramem.Dv = 16;
  EXPECT_TRUE(c.ultramem_layer_config(0).sparse_value_grad);
  c.ultramem_sparse_value_grad = false;
  EXPECT_FALSE(c.ultramem_layer_config(0).sparse_value_grad);
  EXPECT_NE(c.ultramem_layer_config(0).seed, c.ultramem_layer_config(1).seed);
  EXPECT_EQ(c.ultramem_layer_config(1).D, c.d_model);
  EXPECT_EQ(c.ultramem_layer_config(1).num_layers, c.n_layers);
}

// ---------------------------------------------------------------------------------------------
// The shipped tiny configs train on the default prepared data.

TEST(TinyConfigs, ShippedFilesFitTheDefaultPreparedDataAndRun) {
  // `ultramem prepare` defaults to --vocab 8192 and `ultramem train` to seq_len 128. The parameter
  // counts (total, activated) are the ones docs/model.md gives.
  const std::map<std::string, std::pair<int64_t, int64_t>> counts = {{"tiny-dense", {293088, 293088}},
                                                                     {"tiny-moe", {305632, 293344}},
                                                                     {"tiny-pkm", {290288, 288496}},
                                                                     {"tiny-ultramem", {299840, 299584}},
                                                                     {"tiny-ultramemv2", {297048, 296472}},
                                                                     {"tiny-engram", {327856, 295392}}};
  for (const auto& name : kTiny) {
    const ModelConfig c = shipped(name);
    EXPECT_EQ(c.name, name);
    EXPECT_EQ(c.vocab_size, 8192) << name;
    EXPECT_GE(c.max_seq_len, 128) << name;
    EXPECT_EQ(c.d_model, 32) << name;
    EXPECT_EQ(c.n_layers, 3) << name;
    const ModelInfo info = model_info(c);
    EXPECT_EQ(info.params_total, counts.at(name).first) << name;
    EXPECT_EQ(info.params_activated, counts.at(name).second) << name;
    Transformer model(c);
    model->eval();
    torch::NoGradGuard ng;
    const auto logits = model->forward(random_tokens(1, 128, 8192, 22));
    EXPECT_EQ(logits.sizes(), (std::vector<int64_t>{1, 128, 8192})) << name;
    EXPECT_TRUE(torch::isfinite(logits).all().item<bool>()) << name;
  }
}

// ---------------------------------------------------------------------------------------------
// UltraMem first stage. TDQKR keeps m_first rows and m_first columns and takes the final top-m among
// the m_first x m_first rescored candidates (spec section 4), so the rule is m_first <= n and
// m <= m_first^2 (m_first = 0 means m); m_first may be smaller than m.

namespace {

UltraMemConfig first_stage_config(int64_t m, int64_t m_first) {
  UltraMemConfig c;
  c.D = 32;
  c.n = 8;
  c.E = 4;
  c.Dk = 8;
  c.Dv = 16;
  c.r = 2;
  c.C = 2;
  c.H = 2;
  c.m = m;
  c.m_first = m_first;
  c.num_layers = 3;
  c.seed = 5;
  return c;
}

}  // namespace

TEST(UltraMemFirstStage, SmallerThanMConstructsRunsAndHasExactGradients) {
  // (m, m_first): fewer candidates than the grid, and m = m_first^2 (every candidate kept).
  for (const auto& [m, m1] : std::vector<std::pair<int64_t, int64_t>>{{12, 4}, {16, 4}, {5, 3}, {9, 3}}) {
    SCOPED_TRACE("m=" + std::to_string(m) + " m_first=" + std::to_string(m1));
    const UltraMemConfig c = first_stage_config(m, m1);
    EXPECT_NO_THROW(c.validate());
    EXPECT_EQ(c.first_stage_m(), m1);
    UltraMem layer(c);
    layer->to(torch::kDouble);
    torch::manual_seed(23);
    const auto x = torch::randn({2, 5, 32}, torch::kDouble);
    const auto g = torch::randn({2, 5, 32}, torch::kDouble);
    const auto y = layer->forward(x);  // autograd path
    ASSERT_EQ(y.sizes(), x.sizes());
    EXPECT_TRUE(torch::isfinite(y).all().item<bool>());
    EXPECT_GT(y.abs().max().item<double>(), 0.0);
    EXPECT_EQ(layer->stats().tokens, 10);
    torch::Tensor fast;  // the no-grad fast path (kernels on raw buffers) gives the same output
    {
      torch::NoGradGuard ng;
      fast = layer->forward(x);
    }
    ASSERT_EQ(fast.sizes(), x.sizes());
    EXPECT_LE(max_abs_diff(fast, y.detach()), 1e-12 * std::max(1.0, y.abs().max().item<double>()));
    auto loss_fn = [&]() { return (layer->forward(x) * g).sum(); };
    layer->zero_grad();
    loss_fn().backward();
    for (const auto& p : layer->named_parameters()) {
      ASSERT_TRUE(p.value().grad().defined()) << p.key() << " got no gradient";
      expect_grad_matches(loss_fn, p.value().detach(), p.value().grad(), p.key(), /*samples=*/6);
    }
  }
  // In a model, from JSON: builds, runs and round-trips.
  json j = model_config_to_json(shipped("tiny-ultramem"));
  j["vocab_size"] = 64;
  j["max_seq_len"] = 32;
  j["memory"]["ultramem"]["m"] = 12;
  j["memory"]["ultramem"]["m_first"] = 4;
  const ModelConfig c = model_config_from_json(j);
  EXPECT_EQ(c.ultramem_layer_config(1).first_stage_m(), 4);
  EXPECT_EQ(model_config_to_json(model_config_from_json(model_config_to_json(c))), model_config_to_json(c));
  Transformer model(c);
  const auto logits = model->forward(random_tokens(2, 10, 64, 24));
  EXPECT_EQ(logits.sizes(), (std::vector<int64_t>{2, 10, 64}));
  EXPECT_TRUE(torch::isfinite(logits).all().item<bool>());
}

TEST(UltraMemFirstStage, InvalidCombinationsNameTheField) {
  struct Case {
    int64_t m, m_first;
    std::string field;
  };
  const std::vector<Case> cases = {
      {12, 3, "m_first"},  // 3 x 3 = 9 candidates cannot hold m = 12
      {17, 4, "m_first"},  // 16 < 17
      {4, 9, "m_first"},   // more than n = 8 per side
      {12, 0, "m_first"},  // 0 means m = 12, more than n = 8 per side
      {4, -1, "m_first"},
      {65, 8, "m"},        // more than the n*n = 64 grid
      {0, 4, "m"},
  };
  for (const auto& cs : cases) {
    SCOPED_TRACE("m=" + std::to_string(cs.m) + " m_first=" + std::to_string(cs.m_first));
    const UltraMemConfig c = first_stage_config(cs.m, cs.m_first);
    expect_throw_with<std::invalid_argument>([&] { UltraMem layer(c); }, "UltraMemConfig." + cs.field + ":");
  }
  expect_throw_with<std::invalid_argument>([] { first_stage_config(12, 3).validate(); },
                                           "must be >= ceil(sqrt(m))");
  expect_throw_with<std::invalid_argument>([] { first_stage_config(12, 0).validate(); }, "is 0, which means m = 12");
  // Through a model config the error names the memory template and the field.
  json j = model_config_to_json(shipped("tiny-ultramem"));
  j["memory"]["ultramem"]["m"] = 12;
  j["memory"]["ultramem"]["m_first"] = 3;
  expect_throw_with<std::invalid_argument>([&] { model_config_from_json(j); },
                                           "ModelConfig.ultramem: UltraMemConfig.m_first:");
}

// ---------------------------------------------------------------------------------------------
// MoE

TEST(MoELayer, GroupedExpertsMatchAPerTokenLoopAndTheBalanceLossFormula) {
  MoEConfig mc;
  mc.num_experts = 5;
  mc.top_k = 2;
  mc.balance_coef = 0.3;
  torch::NoGradGuard ng;
  MoE moe(12, mc, 7, at::detail::createCPUGenerator(5), 0.5, 0.5);
  moe->to(torch::kDouble);
  torch::manual_seed(13);
  const auto x = torch::randn({3, 6, 12}, torch::kDouble);
  const auto y = moe->forward(x);
  const auto xf = x.view({-1, 12});
  const auto probs = torch::softmax(xf.matmul(moe->router), -1);  // [18, 5]
  auto ref = torch::zeros({18, 12}, torch::kDouble);
  std::vector<double> f(5, 0.0);
  for (int64_t t = 0; t < 18; ++t) {
    auto [w, e] = probs[t].topk(2);
    const double s = w.sum().item<double>();
    for (int64_t j = 0; j < 2; ++j) {
      const int64_t ex = e[j].item<int64_t>();
      f[ex] += 1.0 / 36.0;
      ref[t] += swiglu(xf[t].unsqueeze(0), moe->w_in[ex], moe->w_out[ex]).squeeze(0) * (w[j].item<double>() / s);
    }
  }
  EXPECT_LE(max_abs_diff(y.view({-1, 12}), ref), 1e-12);
  double expected = 0;
  const auto P = probs.mean(0);
  for (int64_t e = 0; e < 5; ++e) expected += f[e] * P[e].item<double>();
  expected *= 0.3 * 5;
  EXPECT_NEAR(moe->balance_loss().item<double>(), expected, 1e-12);
  int64_t assigned = 0;
  for (int64_t c : moe->load()) assigned += c;
  EXPECT_EQ(assigned, 36);
}

// The no-grad forward (ops::moe_decode: few-row kernels, one product per used expert) and the autograd
// forward agree, with the same routing counts and balance loss; T = 1 and 5 use the few-row kernels,
// T = 40 BLAS.
TEST(MoELayer, FusedNoGradForwardMatchesTheAutogradPath) {
  for (int64_t k : {1, 2}) {
    MoEConfig mc;
    mc.num_experts = 6;
    mc.top_k = k;
    mc.balance_coef = 0.1;
    MoE moe(16, mc, 9, at::detail::createCPUGenerator(7), 0.3, 0.3);
    for (int64_t T : {1, 5, 40}) {
      SCOPED_TRACE("top_k=" + std::to_string(k) + " T=" + std::to_string(T));
      torch::manual_seed(T);
      const auto x = torch::randn({T, 16});
      moe->reset_load();
      const auto want = moe->forward(x).detach();
      const double want_balance = moe->balance_loss().item<double>();
      const auto want_load = moe->load();
      moe->reset_load();
      torch::Tensor got;
      {
        torch::NoGradGuard ng;
        got = moe->forward(x);
      }
      EXPECT_LE(max_abs_diff(got, want), 1e-5);
      EXPECT_NEAR(moe->balance_loss().item<double>(), want_balance, 1e-6);
      EXPECT_EQ(moe->load(), want_load);
    }
  }
  MoEConfig mc;
  mc.num_experts = 3;
  mc.top_k = 1;
  MoE moe(8, mc, 4, at::detail::createCPUGenerator(1), 0.3, 0.3);
  torch::NoGradGuard ng;
  EXPECT_THROW(moe->forward(torch::randn({2, 7})), c10::Error);
  EXPECT_EQ(moe->forward(torch::randn({0, 8})).size(0), 0);
}

TEST(MoELayer, BalanceLossIsPositiveAndItsGradientReachesTheRouter) {
  Transformer model(tiny("tiny-moe"));
  model->forward(random_tokens(2, 12, 64, 14));
  const auto aux = model->aux_losses();
  ASSERT_TRUE(aux.count("moe_balance"));
  EXPECT_FALSE(aux.count("tucker"));
  const auto loss = aux.at("moe_balance");
  EXPECT_GT(loss.item<double>(), 0.0);
  loss.backward();
  for (const char* r : {"blocks.1.moe.router", "blocks.2.moe.router"}) {
    const auto g = param(model, r).grad();
    ASSERT_TRUE(g.defined()) << r;
    EXPECT_GT(g.abs().sum().item<double>(), 0.0) << r;
  }
}

TEST(Model, AuxLossesAndRefreshOfTheTuckerFilter) {
  Transformer dense(tiny("tiny-dense"));
  dense->forward(random_tokens(1, 4, 64, 15));
  EXPECT_TRUE(dense->aux_losses().empty());

  Transformer model(tiny("tiny-ultramem"));
  model->forward(random_tokens(1, 4, 64, 15));
  ASSERT_TRUE(model->aux_losses().count("tucker"));
  EXPECT_GE(model->aux_losses().at("tucker").item<double>(), 0.0);
  torch::Tensor u;
  for (const auto& b : model->named_buffers())
    if (b.key() == "memories.1.u") u = b.value();
  ASSERT_TRUE(u.defined());
  const auto u_before = u.clone();
  {
    torch::NoGradGuard ng;
    auto cores = param(model, "memories.1.cores");
    cores.copy_(torch::rand(cores.sizes()) - 0.5);
  }
  model->after_optimizer_step();
  EXPECT_GT(max_abs_diff(u, u_before), 1e-6);
}

// ---------------------------------------------------------------------------------------------
// Gradients in double precision: every parameter, a sample of entries each.

TEST(Model, GradientsOfEveryParameterInDouble) {
  std::vector<ModelConfig> configs;
  for (const auto& name : kTiny) configs.push_back(tiny(name));
  ModelConfig mixed = tiny("tiny-ultramem");  // every FFN kind plus memories reading "none" blocks
  mixed.ffn = {FfnKind::None, FfnKind::MoE, FfnKind::Dense};
  mixed.moe.num_experts = 3;
  mixed.moe.expert_hidden = 8;
  mixed.memory_placement = parse_placement("1:1/1:3", 3);
  mixed.tie_embeddings = false;
  mixed.name = "mixed";
  configs.push_back(mixed);
  for (auto& c : configs) {
    c.d_model = 16;
    c.n_layers = 3;
    c.ffn_hidden = 24;
    c.moe.expert_hidden = 8;
    c.pkm.Dv = 16;
    c.vocab_size = 20;
    Transformer model(c);
    model->to(torch::kDouble);
    const auto tokens = random_tokens(2, 6, 20, 16);
    const auto targets = random_tokens(2, 6, 20, 17);
    auto loss_fn = [&]() {
      auto loss = torch::cross_entropy_loss(model->forward(tokens).view({-1, 20}), targets.view(-1));
      for (const auto& a : model->aux_losses()) loss = loss + a.second;
      return loss;
    };
    model->zero_grad();
    loss_fn().backward();
    for (const auto& p : model->named_parameters()) {
      const auto g = p.value().grad();
      ASSERT_TRUE(g.defined()) << c.name << ": " << p.key() << " got no gradient";
      expect_grad_matches(loss_fn, p.value().detach(), g, c.name + ":" + p.key(), /*samples=*/5, /*eps=*/1e-6,
                          /*rtol=*/1e-5, /*atol=*/1e-9);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// model_info

TEST(ModelInfo, HandCountsForATinyConfig) {
  ModelConfig c;
  c.vocab_size = 16;
  c.d_model = 8;
  c.n_layers = 2;
  c.n_heads = 2;
  c.max_seq_len = 8;  // attention counted at 4 keys per query
  c.ffn_hidden = 12;
  c.ffn = {FfnKind::Dense, FfnKind::MoE};
  c.moe.num_experts = 4;
  c.moe.top_k = 2;
  c.moe.expert_hidden = 6;
  c.tie_embeddings = false;
  c.memory_kind = MemoryKind::UltraMem;
  c.memory_placement = parse_placement("1:2", 2);
  c.ultramem.n = 4;
  c.ultramem.E = 4;
  c.ultramem.Dk = 4;
  c.ultramem.Dv = 4;
  c.ultramem.r = 2;
  c.ultramem.C = 2;
  c.ultramem.H = 1;
  c.ultramem.m = 2;
  c.ultramem.m_first = 3;
  const ModelInfo info = model_info(c);
  EXPECT_EQ(info.context, 4);
  auto part = [&](const char* n) {
    const ModelInfoPart* p = info.find(n);
    EXPECT_NE(p, nullptr) << n;
    return p ? *p : ModelInfoPart{};
  };
  // Embedding 16x8 (a lookup reads one row), untied head 16x8: 2*8*16 = 256 FLOPs.
  EXPECT_EQ(part("embedding").params_total, 128);
  EXPECT_EQ(part("embedding").params_activated, 8);
  EXPECT_EQ(part("lm_head").params_total, 128);
  EXPECT_DOUBLE_EQ(part("lm_head").flops, 256);
  // Attention, per block: 4*64 = 256 params; 2*256 + 4*4*8 = 640 FLOPs.
  EXPECT_EQ(part("attention").params_total, 512);
  EXPECT_DOUBLE_EQ(part("attention").flops, 1280);
  // Norms: two per block (both blocks have an FFN) + final = 5*8.
  EXPECT_EQ(part("norms").params_total, 40);
  // Dense FFN: 3*8*12 = 288 params, 576 FLOPs.
  EXPECT_EQ(part("dense_ffn").params_total, 288);
  EXPECT_DOUBLE_EQ(part("dense_ffn").flops, 576);
  // Router 8x4; experts 4 * 3*8*6 = 576 total, 2 of them active = 288; 576 FLOPs.
  EXPECT_EQ(part("moe_router").params_total, 32);
  EXPECT_DOUBLE_EQ(part("moe_router").flops, 64);
  EXPECT_EQ(part("moe_experts").params_total, 576);
  EXPECT_EQ(part("moe_experts").params_activated, 288);
  EXPECT_DOUBLE_EQ(part("moe_experts").flops, 576);
  // UltraMem: wq 8*8=64, q_scale 8, keys 1*2*4*4*2=64, k_scale 8, cores 2*1*2*2=8, wo 16*8=128 -> 280.
  EXPECT_EQ(part("memory_dense").params_total, 280);
  EXPECT_EQ(part("memory_dense").params_activated, 280);
  // FLOPs: query 2*8*8=128; keys 2*(2*4*1*2*4)=128; filter 2*1*2*2*4=32; rescoring 2*(4*3+2*9)=60;
  // kept per-core 2*1*2*2*(4+2)=48; output 2*16*8=256 -> 652.
  EXPECT_DOUBLE_EQ(part("memory_dense").flops, 652);
  // Values: N = 16/4 = 4 rows of 4; a token reads H*m = 2 rows; pooling 2*2*4 = 16 FLOPs.
  EXPECT_EQ(part("memory_values").params_total, 16);
  EXPECT_EQ(part("memory_values").params_activated, 8);
  EXPECT_DOUBLE_EQ(part("memory_values").flops, 16);
  EXPECT_EQ(info.params_total, 128 + 128 + 512 + 40 + 288 + 32 + 576 + 280 + 16);
  EXPECT_EQ(info.params_activated, 8 + 128 + 512 + 40 + 288 + 32 + 288 + 280 + 8);
  EXPECT_DOUBLE_EQ(info.flops_per_token, 256 + 1280 + 576 + 64 + 576 + 652 + 16);
  const json j = model_info_to_json(info);
  EXPECT_EQ(j["params"].get<int64_t>(), info.params_total);
  EXPECT_EQ(j["parts"]["moe_experts"]["params_activated"].get<int64_t>(), 288);
  const std::string table = model_info_table(info);
  EXPECT_NE(table.find("memory_values"), std::string::npos);
  EXPECT_NE(table.find("total"), std::string::npos);
}

TEST(ModelInfo, TotalParametersEqualTheBuiltModel) {
  std::vector<ModelConfig> configs;
  for (const auto& name : kTiny) configs.push_back(shipped(name));
  for (const auto& name : kTiny) configs.push_back(tiny(name));
  ModelConfig pkm_batch = tiny("tiny-pkm");
  pkm_batch.pkm.query_norm = PKMConfig::QueryNorm::Batch;
  pkm_batch.pkm.Dv = 16;
  pkm_batch.tie_embeddings = false;
  configs.push_back(pkm_batch);
  for (const auto& c : configs) {
    Transformer model(c);
    int64_t n = 0;
    for (const auto& p : model->parameters()) n += p.numel();
    EXPECT_EQ(model_info(c).params_total, n) << c.name;
  }
}

// ---------------------------------------------------------------------------------------------
// Telemetry

TEST(Model, TelemetryReportsMemoryAndRoutingWindows) {
  Transformer um(tiny("tiny-ultramem"));
  um->forward(random_tokens(2, 16, 64, 18));
  const json t = um->telemetry();
  for (const char* key : {"coverage", "kl_uniform", "top1_score", "topm_score", "output_std", "core_l1", "core_l2"})
    for (const char* mem : {"mem0.", "mem1."}) EXPECT_TRUE(t.contains(std::string(mem) + key)) << mem << key;
  EXPECT_GT(t["mem0.coverage"].get<double>(), 0.0);
  EXPECT_LE(t["mem0.coverage"].get<double>(), 1.0);
  EXPECT_GT(t["mem1.output_std"].get<double>(), 0.0);
  EXPECT_EQ(t["mem0.tokens"].get<int64_t>(), 32);
  EXPECT_EQ(um->telemetry()["mem0.tokens"].get<int64_t>(), 0);  // window reset

  Transformer pkm(tiny("tiny-pkm"));
  pkm->forward(random_tokens(2, 16, 64, 18));
  const json tp = pkm->telemetry();
  EXPECT_GT(tp["mem0.output_std"].get<double>(), 0.0);
  EXPECT_EQ(tp["mem0.tokens"].get<int64_t>(), 32);

  Transformer moe(tiny("tiny-moe"));
  moe->forward(random_tokens(2, 16, 64, 19));
  const json tm = moe->telemetry();
  EXPECT_EQ(tm["moe.assignments"].get<int64_t>(), 2 * 16 * 2 * 2);  // tokens * top_k * MoE blocks
  EXPECT_GE(tm["moe.load_max"].get<double>(), 1.0);
  EXPECT_LE(tm["moe.load_max"].get<double>(), 4.0);
  EXPECT_GE(tm["moe.load_cv"].get<double>(), 0.0);
  EXPECT_EQ(moe->telemetry()["moe.assignments"].get<int64_t>(), 0);
}

// ---------------------------------------------------------------------------------------------
// Learning: a short Adam run on a repeating token pattern drives the loss well down.

TEST(Model, ShortTrainingOnARepeatingPatternLearnsForEveryKind) {
  for (const auto& name : kTiny) {
    torch::manual_seed(20);
    Transformer model(tiny(name));
    model->train();
    torch::optim::Adam opt(model->parameters(), torch::optim::AdamOptions(1e-2));
    // Sequences of the period-7 pattern 3, 11, 5, 40, 22, 9, 61 with a random phase per row.
    const auto pattern = torch::tensor({3, 11, 5, 40, 22, 9, 61}, torch::kLong);
    double first = 0, last = 0;
    for (int step = 0; step < 50; ++step) {
      const auto phase = torch::randint(0, 7, {4, 1}, torch::kLong);
      const auto idx = (phase + torch::arange(25, torch::kLong).unsqueeze(0)) % 7;  // [4, 25]
      const auto seq = pattern.index({idx});
      const auto x = seq.narrow(1, 0, 24), y = seq.narrow(1, 1, 24);
      opt.zero_grad();
      auto loss = torch::cross_entropy_loss(model->forward(x).view({-1, 64}), y.reshape(-1));
      for (const auto& a : model->aux_losses()) loss = loss + a.second;
      loss.backward();
      opt.step();
      model->after_optimizer_step();
      if (step == 0) first = loss.item<double>();
      last = loss.item<double>();
    }
    EXPECT_GT(first, 3.0) << name;
    EXPECT_LT(last, 0.3) << name << ": loss " << first << " -> " << last;
  }
}

// ---------------------------------------------------------------------------------------------
// UltraMemV2 as a memory kind: its template, JSON and errors.

TEST(UltraMemV2Config, TemplateJsonAndErrorsNameTheField) {
  const ModelConfig c = shipped("tiny-ultramemv2");
  EXPECT_EQ(c.memory_kind, MemoryKind::UltraMemV2);
  const auto lc = c.ultramem_layer_config(2);
  EXPECT_TRUE(lc.query_per_rank && lc.single_projection);
  EXPECT_EQ(lc.Dp, 4);
  EXPECT_FALSE(lc.aux_loss);  // V2 drops the Tucker aux loss
  EXPECT_EQ(lc.value_init, ValueInit::V2);
  EXPECT_DOUBLE_EQ(lc.inner_ratio, 56.0 / 32.0);  // set by the model: ffn_hidden / d_model
  // JSON round trip; the V2 template is written for this kind only.
  const json j = model_config_to_json(c);
  ASSERT_TRUE(j["memory"].contains("ultramem_v2"));
  EXPECT_EQ(j["memory"]["ultramem_v2"]["Dp"], 4);
  EXPECT_EQ(model_config_to_json(model_config_from_json(j)), j);
  EXPECT_FALSE(model_config_to_json(shipped("tiny-ultramem"))["memory"].contains("ultramem_v2"));
  EXPECT_FALSE(model_config_to_json(shipped("tiny-ultramem"))["memory"]["ultramem"].contains("Dp"));
  // Without Dp the pre-values follow the template's Dv (1 : 3), not the default Dv's.
  json no_dp = j;
  no_dp["memory"]["ultramem_v2"].erase("Dp");
  no_dp["memory"]["ultramem_v2"]["Dv"] = 96;
  EXPECT_EQ(model_config_from_json(no_dp).ultramem_layer_config(0).Dp, 32);
  json bad = j;
  bad["memory"]["ultramem_v2"]["inner_ratio"] = 2.0;
  expect_throw_with<std::invalid_argument>([&] { model_config_from_json(bad); },
                                           "memory.ultramem_v2.inner_ratio: set by the model");
  bad = j;
  bad["memory"]["ultramem_v2"]["Dp"] = 0;
  expect_throw_with<std::invalid_argument>([&] { model_config_from_json(bad); }, "UltraMemConfig.value_init");
  bad = j;
  bad["memory"]["kind"] = "ultramem_v3";
  expect_throw_with<std::invalid_argument>([&] { model_config_from_json(bad); }, "\"ultramem_v2\"");
  // Its pre-values train with the values (memory_values group, row-sparse when the table is large).
  Transformer model(tiny("tiny-ultramemv2"));
  const auto g = model->param_groups();
  EXPECT_EQ(g.memory_values.size(), 6u);  // values and pre_values of 3 memories
}

TEST(EngramConfig, KindJsonAndErrorsNameTheField) {
  const ModelConfig c = shipped("tiny-engram");
  EXPECT_EQ(c.memory_kind, MemoryKind::Engram);
  EXPECT_EQ(c.engram_layer_config(0).D, 32);
  EXPECT_EQ(c.engram_layer_config(0).seed, 2u);  // seed + 1 + k
  const json j = model_config_to_json(c);
  ASSERT_TRUE(j["memory"].contains("engram"));
  EXPECT_EQ(model_config_to_json(model_config_from_json(j)), j);
  EXPECT_FALSE(model_config_to_json(shipped("tiny-ultramem"))["memory"].contains("engram"));
  json bad = j;
  bad["memory"]["engram"]["D"] = 16;
  expect_throw_with<std::invalid_argument>([&] { model_config_from_json(bad); }, "memory.engram.D: set by the model");
  bad = j;
  bad["memory"]["engram"]["d_e"] = 30;
  expect_throw_with<std::invalid_argument>([&] { model_config_from_json(bad); }, "EngramConfig.d_e");
  // The model's KV cache carries the Engram state (slot decoding too); a cache without it is refused.
  Transformer model(tiny("tiny-engram"));
  auto cache = model->make_cache(2, 8);
  EXPECT_EQ(cache.engram.size(), 1u);
  EXPECT_EQ(model->decode_slots(torch::zeros({2}, torch::kLong), cache, {0, 1}, {0, 0}).size(0), 2);
  cache.engram.clear();
  expect_throw_with<std::invalid_argument>(
      [&] { model->decode_slots(torch::zeros({2}, torch::kLong), cache, {0, 1}, {0, 0}); }, "Engram states");
}
