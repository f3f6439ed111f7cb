// Tests of the inference path: the UltraMem layer's no-grad fast path against the autograd path, the
// bf16 / int8 value formats (accuracy bounds, exact relation to the float kernels, errors), the
// normalised-key cache, checkpoints of quantised models, memory-mapped loading (identical logits,
// read-only tables, unaligned files), the 64-byte aligned safetensors layout, and decoding.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "expect_throw.h"
#include "ultramem/infer/evaluate.h"
#include "ultramem/infer/model_loading.h"
#include "ultramem/infer/sampling.h"
#include "ultramem/infer/value_table_files.h"
#include "ultramem/infer/value_tables.h"
#include "ultramem/io/process_memory.h"
#include "ultramem/io/safetensors.h"
#include "ultramem/kernels/feistel.h"
#include "ultramem/kernels/small_matmul.h"
#include "ultramem/kernels/value_quant.h"
#include "ultramem/kernels/value_table_file.h"
#include "ultramem/nn/model_config.h"
#include "ultramem/nn/transformer.h"
#include "ultramem/nn/ultramem.h"
#include "ultramem/ops/block_decode.h"
#include "ultramem/ops/moe_decode.h"
#include "ultramem/ops/tiered_values.h"
#include "ultramem/ops/ultramem_decode.h"
#include "ultramem/checkpoint/checkpoint.h"

namespace fs = std::filesystem;
using ultramem::nn::NormKind;
using ultramem::nn::UltraMem;
using ultramem::nn::UltraMemConfig;
using ultramem::nn::ValueFormat;

namespace {

UltraMemConfig layer_config(uint64_t seed = 3) {
  UltraMemConfig c;
  c.D = 24;
  c.n = 16;
  c.E = 4;
  c.Dk = 20;  // not a multiple of 16: the scoring kernel's padded tail runs
  c.Dv = 32;
  c.r = 2;
  c.C = 2;
  c.H = 2;
  c.m = 5;
  c.m_first = 7;
  c.value_init = ultramem::nn::ValueInit::Fixed;
  c.value_std = 0.5;
  c.seed = seed;
  return c;
}

// Output of the autograd path (grad mode on) and of the fast path (NoGradGuard).
torch::Tensor autograd_forward(UltraMem& layer, const torch::Tensor& x) {
  torch::AutoGradMode on(true);
  return layer->forward(x).detach();
}
torch::Tensor fast_forward(UltraMem& layer, const torch::Tensor& x) {
  torch::NoGradGuard no_grad;
  return layer->forward(x);
}

double max_abs(const torch::Tensor& t) { return t.abs().max().item<double>(); }
double max_diff(const torch::Tensor& a, const torch::Tensor& b) { return (a - b).abs().max().item<double>(); }

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/ultramem_infer_XXXXXX";
    path_ = ::mkdtemp(tmpl);
  }
  ~TempDir() { fs::remove_all(path_); }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// =================================================================================================
// Layer fast path
// =================================================================================================

TEST(FastPath, MatchesAutogradPathFloat) {
  std::vector<UltraMemConfig> configs;
  configs.push_back(layer_config());
  auto c = layer_config(4);
  c.qk_norm = NormKind::Layer;
  c.H = 1;
  c.E = 1;
  c.C = 1;
  c.m_first = 5;
  configs.push_back(c);
  c = layer_config(5);
  c.n = 18;
  c.E = 9;
  c.Dv = 24;
  c.C = 3;
  c.r = 3;
  configs.push_back(c);
  c = layer_config(6);  // the two-sign filter
  c.filter = ultramem::nn::RetrievalFilter::kTwoSign;
  c.m_neg = 3;
  configs.push_back(c);
  c = layer_config(7);  // the rank-R filter, R = r = 2: two folded key sets per side
  c.filter = ultramem::nn::RetrievalFilter::kRankR;
  configs.push_back(c);
  c = layer_config(8);  // the rank-R filter with R = 1 < r = 3
  c.filter = ultramem::nn::RetrievalFilter::kRankR;
  c.r = 3;
  c.filter_rank = 1;
  configs.push_back(c);
  for (const auto& cfg : configs) {
    UltraMem layer(cfg);
    // T = 1 and 6 use the few-row kernels, T = 40 the BLAS products.
    for (int64_t T : {1, 6, 40}) {
      SCOPED_TRACE("T=" + std::to_string(T) + " E=" + std::to_string(cfg.E));
      torch::manual_seed(T);
      const auto x = torch::randn({T, cfg.D});
      const auto want = autograd_forward(layer, x);
      const auto got = fast_forward(layer, x);
      ASSERT_EQ(got.sizes(), want.sizes());
      EXPECT_FALSE(got.requires_grad());
      EXPECT_LE(max_diff(got, want), 1e-6 * std::max(1.0, max_abs(want))) << "max |out| " << max_abs(want);
    }
  }
}

// Compact keys (bf16, int8 with row scales) in the fused path: outputs near the float keys', most kept
// candidates the same (the telemetry's key_agreement), and back to fp32 gives the float result again.
TEST(FastPath, CompactKeys) {
  auto cfg = layer_config();
  cfg.retrieval_sample = 1000;
  cfg.stats_window = 1000000;
  UltraMem layer(cfg);
  torch::manual_seed(3);
  const auto x = torch::randn({12, cfg.D});
  const auto want = fast_forward(layer, x);
  EXPECT_TRUE(std::isnan(layer->stats().key_agreement));
  for (auto f : {ultramem::nn::ValueFormat::kBFloat16, ultramem::nn::ValueFormat::kInt8}) {
    SCOPED_TRACE(ultramem::nn::to_string(f));
    layer->set_key_format(f);
    layer->reset_stats();
    const auto got = fast_forward(layer, x);
    const auto s = layer->stats();
    EXPECT_GE(s.key_agreement, 0.85);
    EXPECT_LE(s.key_agreement, 1.0);
    EXPECT_LE(max_diff(got, want), 0.25 * max_abs(want)) << "max |out| " << max_abs(want);
  }
  layer->set_key_format(ultramem::nn::ValueFormat::kFloat32);
  EXPECT_TRUE(torch::equal(fast_forward(layer, x), want));
}

// Compact filter keys keep a widened copy (kf_wide) for batches above the few rows: the op's scores and
// outputs with it are those of widening the rows on every call, bit for bit, for int8 and bf16 keys.
TEST(FastPath, WidenedCompactFilterKeysGiveTheSameOutputs) {
  namespace ops = ultramem::ops;
  ops::UltraMemDims d;
  d.D = 32, d.Dk = 16, d.Dv = 16, d.H = 2, d.r = 2, d.n = 32, d.C = 2, d.E = 1, d.m = 8, d.m_first = 8;
  torch::manual_seed(11);
  ops::UltraMemDecodeWeights w;
  w.wq = torch::randn({d.D, 2 * d.Dk});
  w.q_scale = torch::ones({2, d.Dk});
  w.cores = torch::randn({d.C, d.H, d.r, d.r});
  w.values = torch::randn({d.N(), d.Dv});
  w.perm = torch::randperm(d.E * d.N(), torch::kLong);
  w.wo = torch::randn({d.E * d.Dv, d.D});
  const auto kn_row = torch::randn({d.H, d.n, d.r, d.Dk}), kn_col = torch::randn({d.H, d.n, d.r, d.Dk});
  const auto keys = ops::fold_filter_keys(kn_row, kn_col, torch::randn({d.H, d.r}), torch::randn({d.H, d.r}));
  const auto x = torch::randn({40, d.D});
  for (const std::string format : {"int8", "bf16"}) {
    SCOPED_TRACE(format);
    w.keys = ops::compact_keys(keys, format);
    ASSERT_TRUE(w.keys.kf_wide.defined());
    torch::Tensor s1, i1, s2, i2;
    const auto wide = ops::ultramem_decode(x, w, d, &s1, &i1);
    w.keys.kf_wide = torch::Tensor();  // the rows widened per call
    const auto per_call = ops::ultramem_decode(x, w, d, &s2, &i2);
    EXPECT_TRUE(torch::equal(i1, i2));
    EXPECT_TRUE(torch::equal(s1, s2));
    EXPECT_TRUE(torch::equal(wide, per_call));
  }
}

TEST(FastPath, MatchesAutogradPathDoubleAndKeepsLeadingShape) {
  UltraMem layer(layer_config());
  layer->to(torch::kDouble);
  torch::manual_seed(1);
  const auto x = torch::randn({2, 3, 24}, torch::kDouble);
  const auto want = autograd_forward(layer, x);
  const auto got = fast_forward(layer, x);
  ASSERT_EQ(got.sizes(), x.sizes());
  EXPECT_LE(max_diff(got, want), 1e-12 * std::max(1.0, max_abs(want)));
}

TEST(FastPath, InferenceModeTakesItToo) {
  UltraMem layer(layer_config());
  torch::manual_seed(2);
  const auto x = torch::randn({4, 24});
  const auto want = fast_forward(layer, x);
  torch::Tensor got;
  {
    torch::InferenceMode guard;
    got = layer->forward(x);
  }
  EXPECT_TRUE(torch::equal(got, want));
}

TEST(FastPath, EmptyBatch) {
  UltraMem layer(layer_config());
  const auto out = fast_forward(layer, torch::zeros({0, 24}));
  EXPECT_EQ(out.sizes(), (std::vector<int64_t>{0, 24}));
}

// A permutation entry outside the grid (corrupt weights) is refused by the fast path with the entry
// named, instead of reading outside the value table.
TEST(FastPath, CorruptPermutationIsRefused) {
  auto cfg = layer_config();
  UltraMem layer(cfg);
  {
    torch::NoGradGuard no_grad;
    layer->perm[7] = cfg.n * cfg.n;
  }
  expect_throw_with<std::runtime_error>([&] { fast_forward(layer, torch::randn({2, cfg.D})); },
                                        "perm[7] = " + std::to_string(cfg.n * cfg.n) + " is outside");
}

TEST(FastPath, KeyCacheFollowsKeyAndScaleUpdates) {
  UltraMem layer(layer_config());
  torch::manual_seed(3);
  const auto x = torch::randn({5, 24});
  const auto before = fast_forward(layer, x);
  {
    torch::NoGradGuard no_grad;
    layer->keys.mul_(-1.5).add_(0.1);  // in-place: bumps the version counter
  }
  const auto after_keys = fast_forward(layer, x);
  EXPECT_GT(max_diff(after_keys, before), 1e-3) << "the keys changed, the output must too";
  EXPECT_LE(max_diff(after_keys, autograd_forward(layer, x)), 1e-6 * std::max(1.0, max_abs(after_keys)));
  {
    torch::NoGradGuard no_grad;
    layer->k_scale.mul_(torch::linspace(0.5, 2.0, 40).view({2, 20}));
  }
  const auto after_scale = fast_forward(layer, x);
  EXPECT_GT(max_diff(after_scale, after_keys), 1e-3);
  EXPECT_LE(max_diff(after_scale, autograd_forward(layer, x)), 1e-6 * std::max(1.0, max_abs(after_scale)));
  // A write through the raw pointer bumps no version: invalidate_inference_cache makes it count.
  float* k = layer->keys.data_ptr<float>();
  for (int64_t i = 0; i < layer->keys.numel(); i += 3) k[i] = -k[i];
  layer->invalidate_inference_cache();
  EXPECT_LE(max_diff(fast_forward(layer, x), autograd_forward(layer, x)), 1e-6 * std::max(1.0, max_abs(after_scale)));
}

// The project's AdamW writes parameters through raw pointers (no version bump): switching modes and
// the per-step refresh_tucker_approx() drop the cache too.
TEST(FastPath, KeyCacheDroppedByModeSwitchAndOptimizerStepHook) {
  UltraMem layer(layer_config());
  torch::manual_seed(8);
  const auto x = torch::randn({3, 24});
  auto scramble_keys = [&] {
    float* k = layer->keys.data_ptr<float>();
    for (int64_t i = 0; i < layer->keys.numel(); i += 2) k[i] = 0.5f - k[i];
  };
  layer->eval();
  fast_forward(layer, x);
  scramble_keys();
  layer->train();
  layer->eval();
  EXPECT_LE(max_diff(fast_forward(layer, x), autograd_forward(layer, x)), 1e-5);
  scramble_keys();
  layer->refresh_tucker_approx();
  EXPECT_LE(max_diff(fast_forward(layer, x), autograd_forward(layer, x)), 1e-5);
}

TEST(FastPath, TelemetryMatchesAutogradPath) {
  auto cfg = layer_config();
  cfg.stats_window = 1 << 20;
  UltraMem a(cfg), b(cfg);
  torch::manual_seed(4);
  const auto x = torch::randn({30, 24});
  autograd_forward(a, x);
  fast_forward(b, x);
  const auto sa = a->stats(), sb = b->stats();
  EXPECT_EQ(sa.tokens, sb.tokens);
  EXPECT_DOUBLE_EQ(sa.coverage, sb.coverage);
  EXPECT_NEAR(sa.kl_uniform, sb.kl_uniform, 1e-12);
  EXPECT_NEAR(sa.top1_score, sb.top1_score, 1e-5 * std::abs(sa.top1_score) + 1e-6);
  EXPECT_NEAR(sa.topm_score, sb.topm_score, 1e-5 * std::abs(sa.topm_score) + 1e-6);
  EXPECT_NEAR(sa.output_std, sb.output_std, 1e-5 * sa.output_std);
  // Without track_stats the fast path records nothing.
  cfg.track_stats = false;
  UltraMem c(cfg);
  fast_forward(c, x);
  EXPECT_EQ(c->stats().tokens, 0);
}

// The two-phase forward (retrieve at the read block, lookup at the write block) is the one-phase
// forward split in two: the same result bit for bit, with or without the prefetch, in every value
// format; misuse is refused.
TEST(FastPath, TwoPhaseEqualsOnePhaseBitForBit) {
  torch::manual_seed(5);
  const auto x = torch::randn({3, 4, 24});
  for (ValueFormat fmt : {ValueFormat::kFloat32, ValueFormat::kBFloat16, ValueFormat::kInt8}) {
    SCOPED_TRACE(ultramem::nn::to_string(fmt));
    UltraMem layer(layer_config());
    layer->set_value_format(fmt);
    const auto one = fast_forward(layer, x);
    torch::NoGradGuard no_grad;
    ASSERT_TRUE(layer->two_phase_applies());
    for (int64_t bytes : {int64_t(0), int64_t(100), int64_t(1) << 20}) {
      const auto pending = layer->retrieve(x, bytes);
      EXPECT_EQ(pending.index.sizes(), (std::vector<int64_t>{12, 2 * 5}));
      const auto two = layer->lookup(pending);
      ASSERT_EQ(two.sizes(), x.sizes());
      EXPECT_TRUE(torch::equal(one, two)) << "prefetch bytes " << bytes;
    }
    EXPECT_EQ(layer->lookup(layer->retrieve(x.narrow(0, 0, 0), 1 << 20)).numel(), 0);
    // An index outside the E*N grid is refused, not read.
    auto bad = layer->retrieve(x, 0);
    bad.index = bad.index.clone();
    bad.index[0][0] = 16 * 16;
    EXPECT_THROW(layer->lookup(bad), c10::Error);
    EXPECT_THROW(layer->lookup(ultramem::nn::UltraMemImpl::PendingLookup()), c10::Error);
  }
  UltraMem layer(layer_config());
  torch::AutoGradMode on(true);
  EXPECT_FALSE(layer->two_phase_applies());
  EXPECT_THROW(layer->retrieve(x, 0), std::logic_error);
}

// =================================================================================================
// Value formats
// =================================================================================================

TEST(ValueFormats, BytesAndFormatsReported) {
  auto cfg = layer_config();
  const int64_t N = cfg.physical_rows(), Dv = cfg.Dv;
  UltraMem f(cfg), b(cfg), i(cfg);
  EXPECT_EQ(f->value_format(), ValueFormat::kFloat32);
  EXPECT_EQ(f->value_bytes(), N * Dv * 4);
  b->set_value_format(ValueFormat::kBFloat16);
  EXPECT_EQ(b->value_format(), ValueFormat::kBFloat16);
  EXPECT_EQ(b->values.scalar_type(), torch::kBFloat16);
  EXPECT_EQ(b->value_bytes(), N * Dv * 2);
  i->set_value_format(ValueFormat::kInt8);
  EXPECT_EQ(i->values.scalar_type(), torch::kChar);
  EXPECT_EQ(i->values_scale.sizes(), (std::vector<int64_t>{N}));
  EXPECT_EQ(i->value_bytes(), N * Dv + N * 4);
  // The scale is a buffer and the table keeps its name: both are saved with the model.
  bool has_scale = false;
  for (const auto& item : i->named_buffers()) has_scale = has_scale || item.key() == "values_scale";
  EXPECT_TRUE(has_scale);
  EXPECT_FALSE(i->values.requires_grad());
  i->set_value_format(ValueFormat::kInt8);  // same format: no-op
  EXPECT_EQ(i->value_format(), ValueFormat::kInt8);
}

// The quantised layer computes exactly what the float32 layer computes on the dequantised table
// (bf16: bitwise; int8: up to the rounding of the folded row scale), and stays close to the float32
// layer on the original table.
TEST(ValueFormats, QuantisedLayerEqualsFloatLayerOnDequantisedTable) {
  const auto cfg = layer_config();
  torch::manual_seed(5);
  const auto x = torch::randn({7, cfg.D});
  UltraMem ref(cfg);
  const auto out_f = fast_forward(ref, x);
  for (ValueFormat fmt : {ValueFormat::kBFloat16, ValueFormat::kInt8}) {
    SCOPED_TRACE(ultramem::nn::to_string(fmt));
    UltraMem q(cfg), deq(cfg);
    q->set_value_format(fmt);
    torch::Tensor table;
    if (fmt == ValueFormat::kBFloat16) {
      table = q->values.to(torch::kFloat);
    } else {
      table = q->values.to(torch::kFloat) * q->values_scale.unsqueeze(1);
    }
    {
      torch::NoGradGuard no_grad;
      deq->values.copy_(table);
    }
    const auto out_q = fast_forward(q, x), out_d = fast_forward(deq, x);
    if (fmt == ValueFormat::kBFloat16)
      EXPECT_TRUE(torch::equal(out_q, out_d)) << "max diff " << max_diff(out_q, out_d);
    else
      EXPECT_LE(max_diff(out_q, out_d), 1e-5 * max_abs(out_d));
    // Accuracy against the unquantised table. The value error is at most 2^-8 |v| (bf16) or
    // max|row| / 254 (int8) per element, passed through the same scores and Wo: the relative output
    // error stays at the percent level (measured: well below 1%).
    const double rel = max_diff(out_q, out_f) / max_abs(out_f);
    EXPECT_GT(rel, 0.0) << "quantisation must change something";
    EXPECT_LT(rel, fmt == ValueFormat::kBFloat16 ? 0.01 : 0.03);
  }
}

TEST(ValueFormats, TrainingForwardWithQuantisedValuesThrows) {
  for (ValueFormat fmt : {ValueFormat::kBFloat16, ValueFormat::kInt8}) {
    UltraMem layer(layer_config());
    layer->set_value_format(fmt);
    torch::AutoGradMode on(true);
    expect_throw_with<std::logic_error>([&] { layer->forward(torch::randn({2, 24})); }, "grad mode");
  }
}

TEST(ValueFormats, ConversionRules) {
  UltraMem b(layer_config());
  const auto original = b->values.detach().clone();
  b->set_value_format(ValueFormat::kBFloat16);
  expect_throw_with<std::logic_error>([&] { b->set_value_format(ValueFormat::kInt8); }, "float32 weights");
  b->set_value_format(ValueFormat::kFloat32);  // bf16 -> float32 is exact
  EXPECT_EQ(b->value_format(), ValueFormat::kFloat32);
  EXPECT_TRUE(b->values.requires_grad());
  const auto widened = original.to(torch::kBFloat16).to(torch::kFloat);
  EXPECT_TRUE(torch::equal(b->values.detach(), widened));
  UltraMem i(layer_config());
  i->set_value_format(ValueFormat::kInt8);
  expect_throw_with<std::logic_error>([&] { i->set_value_format(ValueFormat::kFloat32); }, "int8");
  UltraMem d(layer_config());
  d->to(torch::kDouble);
  expect_throw_with<std::logic_error>([&] { d->set_value_format(ValueFormat::kBFloat16); }, "float32 value table");
  UltraMem nan(layer_config());
  {
    torch::NoGradGuard no_grad;
    nan->values[3][1] = std::numeric_limits<float>::quiet_NaN();
  }
  expect_throw_with<std::invalid_argument>([&] { nan->set_value_format(ValueFormat::kInt8); }, "row 3");
}

TEST(ValueFormats, DtypeConversionKeepsTheStoredTable) {
  UltraMem layer(layer_config());
  layer->set_value_format(ValueFormat::kInt8);
  const auto values = layer->values.clone(), scale = layer->values_scale.clone();
  torch::manual_seed(6);
  const auto x = torch::randn({3, 24});
  const auto out_f = fast_forward(layer, x);
  layer->to(torch::kDouble);
  EXPECT_EQ(layer->wq.scalar_type(), torch::kDouble);
  EXPECT_TRUE(torch::equal(layer->values, values));
  EXPECT_TRUE(torch::equal(layer->values_scale, scale));
  const auto out_d = fast_forward(layer, x.to(torch::kDouble));
  EXPECT_LE(max_diff(out_d.to(torch::kFloat), out_f), 1e-5 * max_abs(out_f));
}

TEST(ValueFormats, SetValueTableValidates) {
  const auto cfg = layer_config();
  const int64_t N = cfg.physical_rows(), Dv = cfg.Dv;
  UltraMem layer(cfg);
  expect_throw_with<std::invalid_argument>([&] { layer->set_value_table(torch::zeros({N + 1, Dv}), {}, false); },
                                           "[N, Dv]");
  expect_throw_with<std::invalid_argument>(
      [&] { layer->set_value_table(torch::zeros({N, Dv}, torch::kInt), {}, false); }, "bfloat16, int8");
  expect_throw_with<std::invalid_argument>(
      [&] { layer->set_value_table(torch::zeros({N, Dv}, torch::kChar), {}, false); }, "scale");
  expect_throw_with<std::invalid_argument>(
      [&] { layer->set_value_table(torch::zeros({N, Dv}), torch::ones({N}), false); }, "int8 values only");
  // A read-only table serves no-grad forwards and refuses training.
  layer->set_value_table(torch::zeros({N, Dv}), {}, /*read_only=*/true);
  EXPECT_TRUE(layer->values_read_only());
  EXPECT_EQ(max_abs(fast_forward(layer, torch::randn({2, 24}))), 0.0) << "a zero table gives a zero output";
  torch::AutoGradMode on(true);
  expect_throw_with<std::logic_error>([&] { layer->forward(torch::randn({2, 24})); }, "read-only");
}

// =================================================================================================
// Models: decoding, checkpoints, memory mapping
// =================================================================================================

ultramem::nn::ModelConfig tiny_model() {
  auto c = ultramem::nn::load_model_config(std::string(ULTRAMEM_CONFIG_DIR) + "/tiny-ultramem.json");
  c.ultramem.value_init = ultramem::nn::ValueInit::Fixed;
  c.ultramem.value_std = 0.3;  // values that matter for the logits
  c.vocab_size = 64;           // the shipped config fits the default prepared data; tests stay small
  c.max_seq_len = 32;
  return c;
}

torch::Tensor logits_of(ultramem::nn::Transformer& model, const torch::Tensor& tokens) {
  torch::NoGradGuard no_grad;
  model->eval();
  return model->forward(tokens);
}

torch::Tensor some_tokens() {
  torch::manual_seed(7);
  return torch::randint(0, 64, {2, 12}, torch::kLong);
}

TEST(Decode, CachedDecodingMatchesFullForwardOnQuantisedModel) {
  for (ValueFormat fmt : {ValueFormat::kFloat32, ValueFormat::kBFloat16, ValueFormat::kInt8}) {
    SCOPED_TRACE(ultramem::nn::to_string(fmt));
    ultramem::nn::Transformer model(tiny_model());
    ultramem::infer::set_value_format(*model, fmt);
    EXPECT_EQ(ultramem::infer::value_format(*model), fmt);
    const auto tokens = some_tokens();
    const auto full = logits_of(model, tokens);
    auto cache = model->make_cache(2, 32);
    std::vector<torch::Tensor> parts;
    parts.push_back(model->forward_cached(tokens.narrow(1, 0, 4), cache));
    for (int64_t t = 4; t < 12; ++t) parts.push_back(model->forward_cached(tokens.narrow(1, t, 1), cache));
    const auto stepped = torch::cat(parts, 1);
    EXPECT_LE(max_diff(stepped, full), 1e-4 * max_abs(full));
    // Greedy generation runs on the quantised model (InferenceMode, KV cache).
    ultramem::infer::SamplingOptions o;
    o.temperature = 0;
    o.max_tokens = 5;
    const auto out = ultramem::infer::generate(model, {1, 2, 3}, o, /*eos_id=*/-1);
    EXPECT_EQ(out.size(), 5u);
  }
}

// Prefetch in the skip window: the tiny model's memories are placed 1:2 and 2:3, so each runs its
// retrieval one block before its lookup; the logits, cached decode steps and telemetry are those of
// the memories run whole (prefetch off), bit for bit.
TEST(Decode, SkipWindowPrefetchLeavesLogitsUnchanged) {
  ultramem::nn::Transformer model(tiny_model());
  EXPECT_EQ(model->value_prefetch(), ultramem::nn::TransformerImpl::kDefaultValuePrefetchBytes);
  EXPECT_THROW(model->set_value_prefetch(-1), std::invalid_argument);
  const auto tokens = some_tokens();
  auto run = [&](int64_t bytes) {
    model->set_value_prefetch(bytes);
    model->telemetry();  // empty the windows
    std::vector<torch::Tensor> out{logits_of(model, tokens)};
    torch::NoGradGuard no_grad;
    auto cache = model->make_cache(2, 32);
    out.push_back(model->forward_cached(tokens.narrow(1, 0, 4), cache));
    for (int64_t t = 4; t < 8; ++t) out.push_back(model->forward_cached(tokens.narrow(1, t, 1), cache));
    return std::make_pair(out, model->telemetry());
  };
  const auto [off, t_off] = run(0);
  for (int64_t bytes : {int64_t(64), ultramem::nn::TransformerImpl::kDefaultValuePrefetchBytes}) {
    const auto [on, t_on] = run(bytes);
    ASSERT_EQ(on.size(), off.size());
    for (size_t i = 0; i < on.size(); ++i) EXPECT_TRUE(torch::equal(on[i], off[i])) << "output " << i;
    EXPECT_EQ(t_on.dump(), t_off.dump());
  }
}

// Engram's rows read ahead (they follow from the tokens): each cached decode step first requests its
// tables' rows; the steps' logits are those without, bit for bit, for float32 and int8 tables.
TEST(Decode, EngramRowsReadAheadLeaveLogitsUnchanged) {
  auto c = ultramem::nn::load_model_config(std::string(ULTRAMEM_CONFIG_DIR) + "/tiny-engram.json");
  c.vocab_size = 64;
  c.max_seq_len = 32;
  c.engram.conv_std = 0.2;
  for (ValueFormat fmt : {ValueFormat::kFloat32, ValueFormat::kInt8}) {
    SCOPED_TRACE(ultramem::nn::to_string(fmt));
    ultramem::nn::Transformer model(c);
    ultramem::infer::set_value_format(*model, fmt);
    model->eval();
    const auto tokens = some_tokens();
    auto run = [&](int64_t bytes) {
      model->set_value_prefetch(bytes);
      torch::NoGradGuard no_grad;
      auto cache = model->make_cache(2, 32);
      std::vector<torch::Tensor> out{model->forward_cached(tokens.narrow(1, 0, 4), cache)};
      for (int64_t t = 4; t < 10; ++t) out.push_back(model->forward_cached(tokens.narrow(1, t, 1), cache));
      return out;
    };
    const auto off = run(0);
    for (int64_t bytes : {int64_t(8), int64_t(1) << 20}) {  // a part of one step's rows, and all of them
      const auto on = run(bytes);
      ASSERT_EQ(on.size(), off.size());
      for (size_t i = 0; i < on.size(); ++i) EXPECT_TRUE(torch::equal(on[i], off[i])) << "step " << i;
    }
    // The cached steps are the full forward's logits (the read-ahead hashed the right history).
    EXPECT_LE(max_diff(torch::cat(off, 1), logits_of(model, tokens.narrow(1, 0, 10))), 1e-4);
  }
}

// =================================================================================================
// Compact dense matrices (bf16 / int8 weights for the decode ops)
// =================================================================================================

// Each op with compact matrices equals the same op on the float matrices they stand for (widened), for
// the few-row kernels (1, 5 rows) and the widened-block BLAS path (20 rows).
TEST(WeightFormats, CompactMatricesMatchTheirWidenedFloats) {
  namespace ops = ultramem::ops;
  torch::manual_seed(11);
  const int64_t D = 48, h = 40, nh = 3, hd = 16, L = 8, V = 70;
  for (const std::string fmt : {"bf16", "int8"}) {
    SCOPED_TRACE(fmt);
    auto compact_of = [&](const torch::Tensor& w_kn) { return ops::compact_rows(w_kn.t().contiguous(), fmt); };
    auto float_of = [&](const ops::Matrix& m) { return ops::widen_rows(m).t().contiguous(); };  // back to [K, N]
    const auto w_in = torch::randn({D, 2 * h}), w_out = torch::randn({h, D}), wqkv = torch::randn({D, 3 * D}) * 0.2,
               wo = torch::randn({D, D}), head = torch::randn({V, D});
    const auto c_in = compact_of(w_in), c_out = compact_of(w_out), c_qkv = compact_of(wqkv), c_o = compact_of(wo);
    const auto c_head = ops::compact_rows(head, fmt);
    EXPECT_EQ(c_in.w.scalar_type(), fmt == "bf16" ? torch::kBFloat16 : torch::kChar);
    EXPECT_EQ(c_in.scale.defined(), fmt == "int8");
    EXPECT_LE(max_diff(ops::widen_rows(c_head), head), (fmt == "bf16" ? 1e-2 : 2e-2) * max_abs(head));
    // bf16 rows are widened exactly: the float ops' results up to rounding. int8 rows up to 16 rows meet
    // activations rounded to 8 bits per block of 32 (kernels::matmul_rows_q8), up to half a step (1/254
    // of the block's max |x|) per input, through one or two products: within 3% of the float ops.
    const double tol = fmt == "bf16" ? 1e-5 : 3e-2;
    for (int64_t rows : {1, 5, 20}) {
      SCOPED_TRACE(rows);
      const double tol_r = rows <= 16 ? tol : 1e-5;  // from 17 rows int8 rows are widened for BLAS
      const auto x = torch::randn({rows, D});
      const auto f1 = ops::swiglu_forward(x, c_in, c_out), f2 = ops::swiglu_forward(x, float_of(c_in), float_of(c_out));
      EXPECT_LE(max_diff(f1, f2), tol_r * max_abs(f2));
      const auto l1 = ops::linear_nt(x, c_head), l2 = ops::linear_nt(x, ops::widen_rows(c_head));
      EXPECT_LE(max_diff(l1, l2), tol_r * max_abs(l2));
      if (fmt == "int8" && rows <= 16) {  // the float product of the quantised activations, up to rounding
        const int64_t Kp = ultramem::kernels::q8_padded(D), nb = Kp / ultramem::kernels::kQ8Block;
        std::vector<int8_t> q(rows * Kp);
        std::vector<float> sc(rows * nb);
        ultramem::kernels::quantise_q8_rows(rows, D, x.data_ptr<float>(), q.data(), sc.data());
        auto xq = torch::empty({rows, D});
        for (int64_t t = 0; t < rows; ++t)
          for (int64_t k = 0; k < D; ++k) xq[t][k] = float(q[t * Kp + k]) * sc[t * nb + k / 32];
        const auto l3 = xq.to(torch::kDouble).matmul(ops::widen_rows(c_head).to(torch::kDouble).t());
        EXPECT_LE(max_diff(l1.to(torch::kDouble), l3), 1e-5 * max_abs(l3));
        EXPECT_GT(max_diff(l1, l2), 0.0);  // and not the float product itself
      }
      const auto cos = torch::randn({L, hd / 2}, torch::kDouble), sin = torch::randn({L, hd / 2}, torch::kDouble);
      auto k1 = torch::randn({rows, nh, L, hd}), v1 = torch::randn({rows, nh, L, hd});
      auto k2 = k1.clone(), v2 = v1.clone();
      const auto a1 = ops::attention_decode(x, c_qkv, c_o, cos, sin, k1, v1, 3);
      const auto a2 = ops::attention_decode(x, float_of(c_qkv), float_of(c_o), cos, sin, k2, v2, 3);
      EXPECT_LE(max_diff(a1, a2), tol_r * max_abs(a2));
      EXPECT_LE(max_diff(k1, k2), tol_r * max_abs(k2));
    }
    // MoE experts: [K, ...] stacks of compact rows.
    const int64_t E = 3;
    const auto router = torch::randn({D, E}), e_in = torch::randn({E, D, 2 * h}), e_out = torch::randn({E, h, D});
    auto stack = [&](const torch::Tensor& w) {  // [E, K, N] -> compact [E, N, K] with [E, N] scales
      const auto rows = w.transpose(1, 2).contiguous();
      const auto m = ops::compact_rows(rows.reshape({-1, rows.size(2)}), fmt);
      return ops::Matrix(m.w.view(rows.sizes()), m.scale.defined() ? m.scale.view({E, rows.size(1)}) : torch::Tensor());
    };
    const auto s_in = stack(e_in), s_out = stack(e_out);
    auto widened = [&](const ops::Matrix& m) {
      const auto flat = ops::Matrix(m.w.reshape({-1, m.w.size(2)}), m.scale.defined() ? m.scale.reshape({-1}) : torch::Tensor());
      return ops::widen_rows(flat).view(m.w.sizes()).transpose(1, 2).contiguous();
    };
    const auto x = torch::randn({9, D});
    const auto m1 = ops::moe_decode(x, router, s_in, s_out, 2), m2 = ops::moe_decode(x, router, widened(s_in), widened(s_out), 2);
    EXPECT_LE(max_diff(m1, m2), tol * max_abs(m2));
    // Refused: compact matrices with a float64 input, int8 rows without their scales, a wrong shape.
    expect_throw_with<c10::Error>([&] { ops::linear_nt(torch::randn({2, D}, torch::kDouble), c_head); }, "float32 input");
    if (fmt == "int8") expect_throw_with<c10::Error>([&] { ops::linear_nt(torch::randn({2, D}), ops::Matrix(c_head.w)); }, "scale");
    expect_throw_with<c10::Error>([&] { ops::swiglu_forward(torch::randn({2, D}), c_out, c_in); }, "swiglu_forward: w_in");
    // A scale with bf16 or float expert stacks is refused, as with single matrices.
    const auto stray = torch::ones({E, 2 * h});
    if (fmt == "bf16")
      expect_throw_with<c10::Error>([&] { ops::moe_decode(x, router, ops::Matrix(s_in.w, stray), s_out, 2); }, "take no scale");
    expect_throw_with<c10::Error>([&] { ops::moe_decode(x, router, ops::Matrix(e_in, stray), e_out, 2); }, "takes no scale");
  }
  EXPECT_THROW(ops::compact_rows(torch::randn({4, 4}), "int4"), std::invalid_argument);
}

// Parameters of the attention, dense FFN, MoE experts and the head (or the tied embedding).
std::vector<torch::Tensor> dense_matrices(ultramem::nn::Transformer& model) {
  std::vector<torch::Tensor> out;
  for (const auto& p : model->named_parameters())
    for (const char* name : {"wqkv", "attn.wo", "w_in", "w_out", "embedding", "lm_head"})
      if (p.key().find(name) != std::string::npos) out.push_back(p.value());
  return out;
}

// set_weight_format rounds the parameters to the compact rows (idempotent), the decode ops read the
// compact copies (cached decoding agrees with the full forward), and a parameter changed afterwards is
// read as float, not from its stale copy.
TEST(WeightFormats, ModelDecodesWithCompactCopiesAndDropsStaleOnes) {
  for (const char* ffn : {"dense", "moe"})
    for (ValueFormat fmt : {ValueFormat::kBFloat16, ValueFormat::kInt8}) {
      SCOPED_TRACE(std::string(ffn) + " " + ultramem::nn::to_string(fmt));
      auto cfg = tiny_model();
      cfg.ffn = {ultramem::nn::parse_ffn_kind(ffn)};
      cfg.moe.num_experts = 3;
      cfg.moe.top_k = 2;
      ultramem::nn::Transformer model(cfg);
      const auto before = logits_of(model, some_tokens());
      model->set_weight_format(fmt);
      EXPECT_EQ(model->weight_format(), fmt);
      int64_t elems = 0;
      for (const auto& p : dense_matrices(model)) elems += p.numel();
      EXPECT_EQ(model->compact_weight_bytes() >= elems * (fmt == ValueFormat::kBFloat16 ? 2 : 1), true);
      std::vector<torch::Tensor> rounded;
      for (const auto& p : dense_matrices(model)) rounded.push_back(p.detach().clone());
      model->set_weight_format(fmt);  // idempotent: the rounded values round to themselves
      const auto again = dense_matrices(model);
      for (size_t i = 0; i < again.size(); ++i) EXPECT_TRUE(torch::equal(again[i], rounded[i])) << i;
      const auto tokens = some_tokens();
      const auto full = logits_of(model, tokens);
      EXPECT_GT(max_diff(full, before), 0.0);  // the weights changed
      // (near-zero logits of a random model: int8 rows of 32 weights move them most)
      EXPECT_LE(max_diff(full, before), (fmt == ValueFormat::kBFloat16 ? 0.03 : 0.25) * max_abs(before));
      auto stepped = [&](ultramem::nn::Transformer& m) {
        torch::NoGradGuard no_grad;
        auto cache = m->make_cache(2, 32);
        std::vector<torch::Tensor> parts;
        parts.push_back(m->forward_cached(tokens.narrow(1, 0, 4), cache));
        for (int64_t t = 4; t < 12; ++t) parts.push_back(m->forward_cached(tokens.narrow(1, t, 1), cache));
        return torch::cat(parts, 1);
      };
      // int8: the activations are rounded to 8 bits (kernels::matmul_rows_q8), so a float rounding
      // difference between the prefill's and the steps' attention can move a value by one step, and in
      // the MoE then flip a near-tie of the router for a token: the mean stays within a few percent.
      const auto step_diff = (stepped(model) - full).abs();
      if (fmt == ValueFormat::kBFloat16)
        EXPECT_LE(step_diff.max().item<double>(), 1e-4 * max_abs(full));
      else if (std::string(ffn) == "dense")
        EXPECT_LE(step_diff.max().item<double>(), 3e-2 * max_abs(full));
      else
        EXPECT_LE(step_diff.mean().item<double>(), 3e-2 * max_abs(full));
      // The decode ops read the compact rows (the dot kernel), not the rounded floats (the FMA kernel):
      // the same values, summed in another order.
      auto copy_of = [&](ultramem::nn::Transformer& from) {
        ultramem::nn::Transformer to(cfg);
        torch::NoGradGuard no_grad;
        const auto src = from->named_parameters();
        for (auto& p : to->named_parameters()) p.value().copy_(src[p.key()]);
        to->eval();
        return to;
      };
      auto rounded_floats = copy_of(model);
      EXPECT_FALSE(torch::equal(stepped(model), stepped(rounded_floats)));
      // Change every dense matrix in place: the decode ops must read the new floats, exactly as a model
      // that never had compact copies does.
      {
        torch::NoGradGuard no_grad;
        for (auto& p : dense_matrices(model)) p.mul_(1.25);
      }
      auto plain = copy_of(model);
      EXPECT_TRUE(torch::equal(stepped(model), stepped(plain)));
    }
}

// Batched generation: a sequence decoded alone through generate_batch takes the path generate takes
// (same tokens); duplicates in one batch decode alike, greedy or sampled (each sequence draws from its
// own generator); prompts of different lengths are fed their own tokens until they end.
TEST(Generate, BatchedPromptsDecodeLikeAloneAndAlike) {
  ultramem::nn::Transformer model(tiny_model());
  const std::vector<int64_t> p1 = {1, 2, 3, 4, 5}, p2 = {7, 9};
  for (double temperature : {0.0, 1.0}) {
    SCOPED_TRACE(temperature);
    ultramem::infer::SamplingOptions o;
    o.temperature = temperature;
    o.seed = 5;
    o.max_tokens = 6;
    const auto alone = ultramem::infer::generate(model, p1, o, /*eos_id=*/-1);
    const auto one = ultramem::infer::generate_batch(model, {p1}, o, -1);
    EXPECT_EQ(one.tokens[0], alone);
    const auto r = ultramem::infer::generate_batch(model, {p1, p2, p1}, o, -1);
    ASSERT_EQ(r.tokens.size(), 3u);
    EXPECT_EQ(r.tokens[0], r.tokens[2]);
    for (int b = 0; b < 3; ++b) {
      EXPECT_EQ(r.tokens[b].size(), 6u) << b;
      EXPECT_EQ(r.stop_reasons[b], "max_tokens") << b;
    }
    // p2 (2 tokens) sets the prefill; p1 is fed its last three prompt tokens in the steps after it.
    EXPECT_EQ(r.steps, 5 - 2 + 6 - 1);
  }
  ultramem::infer::SamplingOptions zero;
  zero.max_tokens = 0;
  const auto none = ultramem::infer::generate_batch(model, {p1, p2}, zero, -1);
  EXPECT_TRUE(none.tokens[0].empty() && none.tokens[1].empty());
  EXPECT_EQ(none.stop_reasons[1], "max_tokens");
  EXPECT_THROW(ultramem::infer::generate_batch(model, {}, zero, -1), std::invalid_argument);
  EXPECT_THROW(ultramem::infer::generate_batch(model, {p1, {}}, zero, -1), std::invalid_argument);
}

TEST(Checkpoints, QuantisedRoundTripKeepsFormatTablesAndLogits) {
  TempDir dir;
  const auto tokens = some_tokens();
  for (ValueFormat fmt : {ValueFormat::kBFloat16, ValueFormat::kInt8, ValueFormat::kFloat32}) {
    SCOPED_TRACE(ultramem::nn::to_string(fmt));
    ultramem::nn::Transformer model(tiny_model());
    ultramem::infer::set_value_format(*model, fmt);
    const auto want = logits_of(model, tokens);
    const std::string path = dir / (std::string(ultramem::nn::to_string(fmt)) + ".safetensors");
    ultramem::infer::save_weights(path, *model, ultramem::nn::model_config_to_json(model->config()), nullptr);
    const auto ckpt = ultramem::checkpoint::read_checkpoint(path);  // verifies the checksum
    EXPECT_EQ(ckpt.metadata.at(ultramem::infer::kValueFormatKey), ultramem::nn::to_string(fmt));
    EXPECT_EQ(ckpt.model.count("memories.0.values_scale"), fmt == ValueFormat::kInt8 ? 1u : 0u);
    for (bool mmap : {false, true}) {
      SCOPED_TRACE(mmap ? "mmap" : "read");
      ultramem::infer::LoadOptions lo;
      lo.mmap = mmap;
      auto loaded = ultramem::infer::load_model(path, lo);
      EXPECT_EQ(loaded.value_format, fmt);
      EXPECT_EQ(loaded.value_bytes, ultramem::infer::value_bytes(*model));
      EXPECT_EQ(loaded.mapped_tables, mmap ? 2 : 0);
      for (const auto& n : loaded.copied) EXPECT_EQ(n.find("values"), std::string::npos) << n << " was copied";
      const auto layers = ultramem::infer::ultramem_layers(*loaded.model);
      const auto mine = ultramem::infer::ultramem_layers(*model);
      ASSERT_EQ(layers.size(), 2u);
      for (size_t k = 0; k < layers.size(); ++k) {
        EXPECT_TRUE(torch::equal(layers[k].second->values, mine[k].second->values));
        EXPECT_EQ(layers[k].second->values_read_only(), mmap);
        EXPECT_EQ(layers[k].second->perm.data_ptr<int64_t>()[5], mine[k].second->perm.data_ptr<int64_t>()[5]);
      }
      const auto got = logits_of(loaded.model, tokens);
      EXPECT_TRUE(torch::equal(got, want)) << "max diff " << max_diff(got, want);
    }
  }
}

TEST(Checkpoints, MappedTablesAreViewsOfTheFileAndRefuseTraining) {
  TempDir dir;
  ultramem::nn::Transformer model(tiny_model());
  const std::string path = dir / "f32.safetensors";
  ultramem::infer::save_weights(path, *model, ultramem::nn::model_config_to_json(model->config()), nullptr);
  ultramem::infer::LoadOptions lo;
  lo.mmap = true;
  std::vector<std::string> notes;
  lo.warn = [&](const std::string& s) { notes.push_back(s); };
  auto loaded = ultramem::infer::load_model(path, lo);
  ASSERT_FALSE(notes.empty());
  EXPECT_NE(notes[0].find("checksum not verified"), std::string::npos);
  // The file's bytes at the table's offset are the table (the view points into the mapping).
  auto mapped = ultramem::io::map_safetensors(path);
  for (const auto& [name, t] : mapped.tensors)
    if (name == "model.memories.0.values") {
      EXPECT_TRUE(torch::equal(t, ultramem::infer::ultramem_layers(*loaded.model)[0].second->values));
      EXPECT_EQ(reinterpret_cast<uintptr_t>(t.data_ptr()) % 64, 0u);
    }
  loaded.model->train();
  torch::AutoGradMode on(true);
  expect_throw_with<std::logic_error>([&] { loaded.model->forward(some_tokens()); }, "read-only memory mapping");
}

// A checkpoint whose value table is not 64-byte aligned (an older writer, another tool) still loads
// with --mmap: the table is copied and reported.
TEST(Checkpoints, UnalignedTableIsCopiedWithAWarning) {
  TempDir dir;
  ultramem::nn::Transformer model(tiny_model());
  const std::string good = dir / "good.safetensors", odd = dir / "odd.safetensors";
  ultramem::infer::save_weights(good, *model, ultramem::nn::model_config_to_json(model->config()), nullptr);
  std::map<std::string, std::string> meta;
  auto tensors = ultramem::io::load_safetensors(good, &meta);
  // A 3-byte tensor first shifts every offset off the 64-byte grid; the mmap path does not need the
  // checksum, and the file is otherwise a valid checkpoint.
  tensors.insert(tensors.begin(), {"model.padding_probe", torch::zeros({3}, torch::kByte)});
  ultramem::io::save_safetensors(odd, tensors, meta);
  ultramem::infer::LoadOptions lo;
  lo.mmap = true;
  std::vector<std::string> notes;
  lo.warn = [&](const std::string& s) { notes.push_back(s); };
  // The probe is an unexpected tensor for the model: loading names it.
  expect_throw_with<std::runtime_error>([&] { ultramem::infer::load_model(odd, lo); }, "padding_probe");
  bool warned = false;
  for (const auto& n : notes) warned = warned || n.find("memories.0.values' is not 64-byte aligned") != std::string::npos;
  EXPECT_TRUE(warned);
  // Without the probe but with an odd-sized tensor placed first, the load succeeds from copies.
  tensors.erase(tensors.begin());
  std::stable_partition(tensors.begin(), tensors.end(), [](const auto& nt) { return nt.first == "model.memories.0.u"; });
  ultramem::io::save_safetensors(odd, tensors, meta);
  notes.clear();
  auto loaded = ultramem::infer::load_model(odd, lo);
  EXPECT_FALSE(loaded.copied.empty());
  EXPECT_TRUE(torch::equal(logits_of(loaded.model, some_tokens()), logits_of(model, some_tokens())));
}

TEST(Safetensors, DataBufferStartsAlignedAndMappedTensorsAreViews) {
  TempDir dir;
  const std::string path = dir / "a.safetensors";
  std::vector<std::pair<std::string, torch::Tensor>> tensors = {
      {"big", torch::arange(64 * 16, torch::kFloat).view({64, 16})},  // 4096 bytes: offset 0
      {"odd", torch::arange(3, torch::kByte)},                        // 3 bytes: offset 4096
      {"after", torch::arange(5, torch::kLong)}};                     // offset 4099: unaligned
  ultramem::io::save_safetensors(path, tensors, {{"k", "v"}});
  std::ifstream f(path, std::ios::binary);
  unsigned char len[8];
  f.read(reinterpret_cast<char*>(len), 8);
  uint64_t hlen = 0;
  for (int i = 0; i < 8; ++i) hlen |= uint64_t(len[i]) << (8 * i);
  EXPECT_EQ((8 + hlen) % 64, 0u) << "the data buffer must start 64-byte aligned";
  auto m = ultramem::io::map_safetensors(path);
  EXPECT_EQ(m.metadata.at("k"), "v");
  ASSERT_EQ(m.tensors.size(), 3u);
  EXPECT_EQ(m.copied, (std::vector<std::string>{"after"}));
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(m.tensors[i].first, tensors[i].first);
    EXPECT_TRUE(torch::equal(m.tensors[i].second, tensors[i].second));
  }
  EXPECT_EQ(reinterpret_cast<uintptr_t>(m.tensors[0].second.data_ptr()) % 64, 0u);
  // A view outlives the MappedSafetensors that made it.
  const torch::Tensor big = m.tensors[0].second;
  m = ultramem::io::MappedSafetensors{};
  EXPECT_EQ(big[63][15].item<float>(), 64 * 16 - 1);
}

TEST(Evaluate, MeanLossIsTheTokenAverage) {
  ultramem::nn::Transformer model(tiny_model());
  const auto tokens = some_tokens();
  ultramem::data::Batch b{tokens.narrow(1, 0, 11), tokens.narrow(1, 1, 11)};
  const auto r = ultramem::infer::mean_loss(model, {b, b});
  torch::NoGradGuard no_grad;
  const auto logits = model->forward(b.inputs);
  const double want = torch::nn::functional::cross_entropy(logits.reshape({-1, 64}), b.targets.reshape(-1)).item<double>();
  EXPECT_NEAR(r.loss, want, 1e-6);
  EXPECT_EQ(r.tokens, 2 * 2 * 11);
  EXPECT_THROW(ultramem::infer::mean_loss(model, {}), std::invalid_argument);
}

// =================================================================================================
// Tiered value tables (issue 17): a layer whose table is a file behind a row cache smaller than the table
// gives bit-identical outputs to the same layer with the table in memory (int8 and bf16), in one call and
// in two phases, with the stored permutation and with the Feistel key whose materialisation it holds.

TEST(TieredValues, ALayerServedFromAFileEqualsItsInMemoryTable) {
  namespace uk = ultramem::kernels;
  TempDir dir;
  UltraMemConfig cfg = layer_config(5);
  cfg.n = 128;  // N = 4096 rows; the cache holds about 1100
  const int64_t N = cfg.physical_rows();
  torch::manual_seed(1);
  const auto x = torch::randn({37, cfg.D});
  for (const bool feistel : {false, true}) {
    for (const auto format : {ValueFormat::kInt8, ValueFormat::kBFloat16}) {
      // With the Feistel key the file's layer holds no table and no permutation at all (external values);
      // the in-memory layer's stored permutation is the key's materialisation.
      UltraMemConfig ext = cfg;
      ext.external_values = feistel;
      UltraMem mem(cfg), file(ext);
      std::optional<uint64_t> key;
      if (feistel) {
        key = 99;
        EXPECT_EQ(file->values.numel(), 0);
        EXPECT_EQ(file->perm.numel(), 0);
        const uk::FeistelPermutation f(uint64_t(cfg.E * N), *key);
        auto perm = torch::empty({cfg.E * N}, torch::kLong);
        for (int64_t g = 0; g < cfg.E * N; ++g) perm[g] = int64_t(f.forward(uint64_t(g)));
        torch::NoGradGuard no_grad;
        mem->perm.copy_(perm);
        file->wo.copy_(mem->wo);  // the external layer skips the table's draws, so its later weights differ
        expect_throw_with<std::logic_error>([&] { file->forward(x); }, "install its table file");
      }
      const auto values = mem->values.detach().clone();  // [N, Dv] float32
      const std::string path = dir / (std::string("t.") + ultramem::nn::to_string(format) + (feistel ? ".f" : ""));
      uk::write_table_file(path, format == ValueFormat::kInt8 ? uk::TableFormat::kInt8 : uk::TableFormat::kBf16, N,
                           cfg.Dv, [&](int64_t first, int64_t count, float* out) {
                             std::memcpy(out, values.data_ptr<float>() + first * cfg.Dv, sizeof(float) * count * cfg.Dv);
                           });
      mem->set_value_format(format);
      auto tiered = std::make_shared<ultramem::ops::TieredValues>(path, 1100 * (cfg.Dv * 2 + 64), cfg.E, key);
      EXPECT_LT(tiered->cache_rows(), N);
      file->set_tiered_values(tiered);
      torch::NoGradGuard no_grad;
      for (int rep = 0; rep < 3; ++rep) {  // cold, then warm cache
        const auto want = mem->forward(x), got = file->forward(x);
        ASSERT_TRUE(torch::equal(want, got)) << ultramem::nn::to_string(format) << " feistel " << feistel << " rep " << rep;
        const auto pending = file->retrieve(x, 0);
        ASSERT_TRUE(torch::equal(file->lookup(pending), want)) << "two phases";
      }
      const auto st = tiered->stats();
      EXPECT_GT(st.misses, 0);
      EXPECT_GT(st.hits, st.misses) << "the second and third passes hit the cache";
      EXPECT_GE(st.bytes_read, st.misses * (format == ValueFormat::kInt8 ? cfg.Dv + 4 : 2 * cfg.Dv));
      // Training needs the table in memory.
      torch::AutoGradMode on(true);
      expect_throw_with<std::logic_error>([&] { file->forward(x); }, "inference only");
    }
  }
  // A layer of 2^30 virtual slots (2^28 rows) with external values allocates neither its 128 GiB table
  // nor its 8 GiB permutation.
  {
    const int64_t before = ultramem::io::resident_bytes();
    UltraMemConfig big = cfg;
    big.n = 1 << 15;
    big.external_values = true;
    UltraMem huge(big);
    EXPECT_EQ(huge->config().physical_rows(), int64_t(1) << 28);
    EXPECT_LT(ultramem::io::resident_bytes() - before, int64_t(256) << 20);
    torch::AutoGradMode on(true);
    expect_throw_with<std::logic_error>([&] { huge->forward(x); }, "external");
  }
  // A table file of the wrong size for the layer: the first forward names the file and both sizes.
  const std::string small = dir / "small.int8";
  uk::write_table_file(small, uk::TableFormat::kInt8, N / 2, cfg.Dv,
                       [&](int64_t first, int64_t count, float* out) { uk::gaussian_rows(1, 0.5f, first, count, cfg.Dv, out); });
  UltraMem layer(cfg);
  auto open = [&](const std::string& p, std::optional<uint64_t> key) {
    return std::make_shared<ultramem::ops::TieredValues>(p, 1 << 20, cfg.E, key);
  };
  expect_throw_with<std::invalid_argument>([&] { layer->set_tiered_values(open(small, std::nullopt)); },
                                           "small.int8 holds 2048 rows");
  EXPECT_EQ(layer->tiered_values(), nullptr);
  // A Feistel key that does not materialise the layer's stored (shuffled) permutation; a key other than
  // the layer's permutation_key; an external layer without a key: each refused when installed.
  const std::string fits = dir / "fits.int8";
  uk::write_table_file(fits, uk::TableFormat::kInt8, N, cfg.Dv,
                       [&](int64_t first, int64_t count, float* out) { uk::gaussian_rows(1, 0.5f, first, count, cfg.Dv, out); });
  expect_throw_with<std::invalid_argument>([&] { layer->set_tiered_values(open(fits, 99)); },
                                           "not this layer's permutation: perm[0]");
  UltraMemConfig keyed = cfg;
  keyed.permutation_key = 98;
  UltraMem keyed_layer(keyed);
  EXPECT_EQ(ultramem::ops::feistel_mismatch(keyed_layer->perm, cfg.n * cfg.n, 98, cfg.n * cfg.n), "")
      << "a permutation_key layer's stored permutation is the key's materialisation";
  expect_throw_with<std::invalid_argument>([&] { keyed_layer->set_tiered_values(open(fits, 99)); },
                                           "Feistel key 99 but the layer's permutation_key is 98");
  keyed_layer->set_tiered_values(open(fits, 98));
  UltraMemConfig ext = cfg;
  ext.external_values = true;
  UltraMem ext_layer(ext);
  expect_throw_with<std::invalid_argument>([&] { ext_layer->set_tiered_values(open(fits, std::nullopt)); },
                                           "has no Feistel key");
  layer->set_tiered_values(open(fits, std::nullopt));  // the stored permutation, no key: fine
}

// An UltraMemV2 layer (query per rank, one projection, pre-values kept in memory) served from a table file
// equals the same layer with its table quantised in memory, bit for bit, in one call and in two phases. A V2
// layer with external values (no stored permutation to read its pre-values through) is refused.
TEST(TieredValues, AV2LayerServedFromAFileEqualsItsInMemoryTable) {
  namespace uk = ultramem::kernels;
  TempDir dir;
  UltraMemConfig cfg = layer_config(5);
  cfg.n = 128;  // N = 4096 rows; the cache holds about 1100
  cfg.query_per_rank = true;
  cfg.single_projection = true;
  cfg.Dp = 6;
  const int64_t N = cfg.physical_rows();
  torch::manual_seed(2);
  const auto x = torch::randn({9, cfg.D});
  UltraMem mem(cfg), file(cfg);  // the same seed: the same weights
  const auto values = mem->values.detach().clone();
  const std::string path = dir / "v2.int8";
  uk::write_table_file(path, uk::TableFormat::kInt8, N, cfg.Dv, [&](int64_t first, int64_t count, float* out) {
    std::memcpy(out, values.data_ptr<float>() + first * cfg.Dv, sizeof(float) * count * cfg.Dv);
  });
  mem->set_value_format(ValueFormat::kInt8);
  auto tiered = std::make_shared<ultramem::ops::TieredValues>(path, 1100 * (cfg.Dv * 2 + 64), cfg.E, std::nullopt);
  EXPECT_LT(tiered->cache_rows(), N);
  file->set_tiered_values(tiered);
  torch::NoGradGuard no_grad;
  for (int rep = 0; rep < 2; ++rep) {
    const auto want = mem->forward(x);
    ASSERT_TRUE(torch::equal(file->forward(x), want)) << "rep " << rep;
    ASSERT_TRUE(torch::equal(file->lookup(file->retrieve(x, 0)), want)) << "two phases, rep " << rep;
  }
  EXPECT_GT(tiered->stats().misses, 0);
  UltraMemConfig ext = cfg;
  ext.external_values = true;
  UltraMem ext_layer(ext);
  expect_throw_with<std::logic_error>(
      [&] { ext_layer->set_tiered_values(std::make_shared<ultramem::ops::TieredValues>(path, 1 << 20, cfg.E, 7)); },
      "pre-values");
}

// A model served from table files (export-tables, then load_model with value_tables and caches smaller than
// the tables) gives the logits of its checkpoint with the tables quantised in memory, bit for bit: the
// whole-sequence forward and cached decode steps, with the reads issued a block ahead (the tiny model's
// memories are placed 1:2 and 2:3) and not, for int8 and bf16 rows, with the stored shuffled permutation
// and with a permutation_key (saved in the checkpoint's config as the key).
TEST(TieredValues, AModelServedFromTableFilesEqualsItsQuantisedCheckpoint) {
  namespace inf = ultramem::infer;
  TempDir dir;
  const auto tokens = some_tokens();
  auto decode = [&](ultramem::nn::Transformer& m) {
    torch::NoGradGuard no_grad;
    auto cache = m->make_cache(2, 32);
    std::vector<torch::Tensor> parts{m->forward_cached(tokens.narrow(1, 0, 4), cache)};
    for (int64_t t = 4; t < 10; ++t) parts.push_back(m->forward_cached(tokens.narrow(1, t, 1), cache));
    return torch::cat(parts, 1);
  };
  for (const uint64_t key : {uint64_t(0), uint64_t(4242)}) {
    SCOPED_TRACE("permutation_key " + std::to_string(key));
    auto cfg = tiny_model();
    cfg.ultramem.n = 128;  // N = 4096 rows per layer; the caches hold about 1100 each
    cfg.ultramem.permutation_key = key;
    ultramem::nn::Transformer model(cfg);
    const auto json = ultramem::nn::model_config_to_json(model->config());
    EXPECT_EQ(json["memory"]["ultramem"].contains("permutation_key"), key != 0) << json.dump();
    EXPECT_EQ(ultramem::nn::model_config_from_json(json).ultramem.permutation_key, key);
    const std::string ckpt = dir / ("m" + std::to_string(key) + ".safetensors");
    inf::save_weights(ckpt, *model, json, nullptr);
    for (const std::string fmt : {"int8", "bf16"}) {
      SCOPED_TRACE(fmt);
      inf::ExportTablesOptions eo;
      eo.checkpoint = ckpt;
      eo.out_dir = dir / ("tables" + std::to_string(key) + fmt);
      eo.format = fmt;
      std::ostringstream log;
      const auto summary = inf::export_value_tables(eo, log);
      ASSERT_EQ(summary.size(), 2u);
      EXPECT_EQ(summary[0]["rows"], 4096);
      auto mem = inf::load_model(ckpt);
      inf::set_value_format(*mem.model, ultramem::nn::parse_value_format(fmt));
      inf::LoadOptions lo;
      lo.value_tables = eo.out_dir;
      lo.value_cache_bytes = 2 * 1100 * (cfg.ultramem.Dv * 2 + 64);
      auto file = inf::load_model(ckpt, lo);
      EXPECT_EQ(file.file_tables, 2);
      EXPECT_EQ(file.mapped_permutations, 2);
      EXPECT_EQ(mem.mapped_permutations, 0);
      for (const auto& [name, layer] : inf::ultramem_layers(*file.model)) {  // views of the mapped file, no copy
        const auto* perm = static_cast<const char*>(layer->perm.data_ptr());
        const auto* values = static_cast<const char*>(layer->values.data_ptr());  // mapped as with --mmap
        EXPECT_LT(std::abs(perm - values), int64_t(fs::file_size(ckpt))) << name;
      }
      for (const auto& [name, layer] : inf::ultramem_layers(*file.model)) {
        ASSERT_NE(layer->tiered_values(), nullptr) << name;
        EXPECT_LT(layer->tiered_values()->cache_rows(), 4096) << name;
        EXPECT_EQ(layer->tiered_values()->feistel_key().has_value(), key != 0);
      }
      EXPECT_TRUE(torch::equal(logits_of(file.model, tokens), logits_of(mem.model, tokens)));
      const auto want = decode(mem.model);
      EXPECT_TRUE(file.model->tiered_reads_ahead());
      EXPECT_TRUE(torch::equal(decode(file.model), want)) << "reads ahead";
      file.model->set_tiered_reads_ahead(false);
      EXPECT_TRUE(torch::equal(decode(file.model), want)) << "reads waited for at once";
      const auto st = inf::ultramem_layers(*file.model)[0].second->tiered_values()->stats();
      EXPECT_GT(st.misses, 0);
      EXPECT_GT(st.hits, 0);
    }
  }
  // With a permutation_key the stored permutation is not read at all: a checkpoint whose stored one is
  // damaged serves from its table files, and refuses to run with its tables in memory.
  {
    auto cfg = tiny_model();
    cfg.ultramem.n = 128;
    cfg.ultramem.permutation_key = 4242;
    ultramem::nn::Transformer model(cfg);
    for (const auto& [name, layer] : inf::ultramem_layers(*model)) {
      torch::NoGradGuard no_grad;
      layer->perm.fill_(-1);
    }
    const std::string ckpt = dir / "damaged_perm.safetensors";
    inf::save_weights(ckpt, *model, ultramem::nn::model_config_to_json(model->config()), nullptr);
    inf::LoadOptions lo;
    lo.value_tables = dir / "tables4242int8";  // the same key: the same rows
    auto served = inf::load_model(ckpt, lo);
    EXPECT_TRUE(torch::isfinite(logits_of(served.model, tokens)).all().item<bool>());
    auto in_memory = inf::load_model(ckpt);
    expect_throw_with<std::runtime_error>([&] { logits_of(in_memory.model, tokens); }, "corrupt weights");
  }
  // Tables of another model's size, a folder without them, and a table already compact are refused.
  auto small = tiny_model();
  small.ultramem.n = 64;
  ultramem::nn::Transformer other(small);
  const std::string other_ckpt = dir / "other.safetensors";
  inf::save_weights(other_ckpt, *other, ultramem::nn::model_config_to_json(other->config()), nullptr);
  inf::LoadOptions lo;
  lo.value_tables = dir / "tables0int8";
  expect_throw_with<std::invalid_argument>([&] { inf::load_model(other_ckpt, lo); }, "holds 4096 rows");
  lo.value_tables = dir / "empty";
  fs::create_directories(lo.value_tables);
  expect_throw_with<std::runtime_error>([&] { inf::load_model(other_ckpt, lo); }, "memories.0.table");
  inf::set_value_format(*other, ValueFormat::kInt8);
  const std::string int8_ckpt = dir / "other.int8.safetensors";
  inf::save_weights(int8_ckpt, *other, ultramem::nn::model_config_to_json(other->config()), nullptr);
  inf::ExportTablesOptions eo;
  eo.checkpoint = int8_ckpt;
  eo.out_dir = dir / "never";
  std::ostringstream log;
  expect_throw_with<std::invalid_argument>([&] { inf::export_value_tables(eo, log); }, "export from the float32");
  EXPECT_THROW(inf::value_cache_bytes(0), std::invalid_argument);
  EXPECT_THROW(inf::value_cache_bytes(std::nan("")), std::invalid_argument);
}

}  // namespace
