// Tests of the training layer: AdamW (dense against a hand computation and torch::optim::AdamW,
// row-sparse against dense), gradient clipping, schedules, train-config JSON, checkpoints (round trip,
// corruption, truncation, wrong config, interrupted writes) and the trainer (resume exactness,
// gradient accumulation, metrics).
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "ultramem/nn/model_config.h"
#include "ultramem/nn/transformer.h"
#include "ultramem/train/batch_source.h"
#include "ultramem/checkpoint/checkpoint.h"
#include "ultramem/train/grad_clip.h"
#include "ultramem/train/optimizer.h"
#include "ultramem/train/schedule.h"
#include "ultramem/train/train_config.h"
#include "ultramem/train/trainer.h"
#include "ultramem/train/transformer_model.h"

namespace fs = std::filesystem;
using namespace ultramem;
using train::AdamW;
using train::ParamGroup;

namespace {

// A fresh, empty directory under the system temp dir, removed at the end of the test.
class TempDir {
 public:
  explicit TempDir(const std::string& tag) {
    path_ = fs::temp_directory_path() / ("ultramem_test_train_" + tag + "_" + std::to_string(::getpid()));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  std::string str() const { return path_.string(); }

 private:
  fs::path path_;
};

// Expects `fn` to throw E with a message containing every one of `parts`.
template <typename E, typename Fn>
void expect_throw_with(Fn&& fn, const std::vector<std::string>& parts) {
  try {
    fn();
    ADD_FAILURE() << "no exception thrown";
  } catch (const E& e) {
    const std::string msg = e.what();
    for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception type: " << e.what();
  }
}

torch::Tensor leaf(torch::Tensor t) { return t.set_requires_grad(true); }

void set_grad(torch::Tensor& p, const torch::Tensor& g) { p.mutable_grad() = g; }

// ---------------------------------------------------------------------------------------------------
// Schedules

TEST(Schedule, CosineWarmupExactValues) {
  const train::CosineSchedule s(1e-3, 10, 110, 0.1);
  EXPECT_DOUBLE_EQ(s(0), 1e-4);      // (0 + 1) / 10 of the peak
  EXPECT_DOUBLE_EQ(s(4), 5e-4);
  EXPECT_DOUBLE_EQ(s(9), 1e-3);
  EXPECT_DOUBLE_EQ(s(10), 1e-3);     // cosine starts at the peak
  EXPECT_DOUBLE_EQ(s(60), 1e-4 + 0.9e-3 * 0.5);  // half way: cos(pi/2) = 0
  EXPECT_NEAR(s(35), 1e-4 + 0.9e-3 * 0.5 * (1 + std::cos(M_PI * 0.25)), 1e-18);
  EXPECT_DOUBLE_EQ(s(110), 1e-4);    // end: min_lr_ratio * peak
  EXPECT_DOUBLE_EQ(s(500), 1e-4);    // and stays there
  for (int64_t k = 11; k <= 110; ++k) EXPECT_LE(s(k), s(k - 1)) << k;
  const train::CosineSchedule no_warmup(2.0, 0, 4, 0.0);
  EXPECT_DOUBLE_EQ(no_warmup(0), 2.0);
  EXPECT_DOUBLE_EQ(no_warmup(2), 1.0);
  EXPECT_DOUBLE_EQ(no_warmup(4), 0.0);
  EXPECT_THROW(train::CosineSchedule(0.0, 1, 10, 0.1), std::invalid_argument);
  EXPECT_THROW(train::CosineSchedule(1.0, 11, 10, 0.1), std::invalid_argument);
  EXPECT_THROW(train::CosineSchedule(1.0, 1, 10, 1.5), std::invalid_argument);
}

TEST(Schedule, ValueMultiplierExactValuesAndNeverBelowOne) {
  const train::ValueLrMultiplier m(10.0, 100);
  EXPECT_DOUBLE_EQ(m(0), 10.0);
  EXPECT_DOUBLE_EQ(m(50), 5.5);
  EXPECT_DOUBLE_EQ(m(90), 1.9);
  EXPECT_DOUBLE_EQ(m(100), 1.0);
  for (int64_t s = 0; s < 1000; ++s) EXPECT_GE(m(s), 1.0) << s;
  EXPECT_DOUBLE_EQ(m(101), 1.0);
  EXPECT_DOUBLE_EQ(m(100000), 1.0);  // the formula without the clamp would be far below 0 here
  const train::ValueLrMultiplier four(4.0, 8);
  EXPECT_DOUBLE_EQ(four(2), 1.0 + 3.0 * 0.75);
  EXPECT_DOUBLE_EQ(train::ValueLrMultiplier(1.0, 10)(0), 1.0);
  EXPECT_DOUBLE_EQ(train::ValueLrMultiplier(10.0, 0)(0), 1.0);
  EXPECT_THROW(train::ValueLrMultiplier(0.5, 10), std::invalid_argument);
  EXPECT_THROW(train::ValueLrMultiplier(10.0, -1), std::invalid_argument);
}

// ---------------------------------------------------------------------------------------------------
// AdamW

TEST(AdamW, DenseMatchesHandComputation) {
  const double lr = 0.1, wd = 0.5, b1 = 0.9, b2 = 0.95, eps = 1e-8;
  auto p = leaf(torch::tensor({1.0, -2.0, 0.5}, torch::kDouble));
  std::vector<ParamGroup> groups(1);
  groups[0].name = "g";
  groups[0].params = {p};
  groups[0].weight_decay = wd;
  AdamW opt(groups, {b1, b2, eps});
  const std::vector<std::vector<double>> grads = {{0.3, -0.1, 0.0}, {-0.2, 0.4, 1.0}};
  std::vector<double> w = {1.0, -2.0, 0.5}, m(3, 0.0), v(3, 0.0);
  for (int t = 1; t <= 2; ++t) {
    set_grad(p, torch::tensor(grads[t - 1], torch::kDouble));
    opt.step(lr);
    for (int i = 0; i < 3; ++i) {
      const double g = grads[t - 1][i];
      w[i] -= lr * wd * w[i];
      m[i] = b1 * m[i] + (1 - b1) * g;
      v[i] = b2 * v[i] + (1 - b2) * g * g;
      const double mhat = m[i] / (1 - std::pow(b1, t)), vhat = v[i] / (1 - std::pow(b2, t));
      w[i] -= lr * mhat / (std::sqrt(vhat) + eps);
    }
    for (int i = 0; i < 3; ++i) EXPECT_NEAR(p[i].item<double>(), w[i], 1e-12) << "t=" << t << " i=" << i;
  }
  EXPECT_EQ(opt.step_count(), 2);
}

TEST(AdamW, DenseMatchesTorchAdamWWithDecoupledDecay) {
  torch::manual_seed(1);
  const auto init = torch::randn({5, 7});
  auto mine = leaf(init.clone());
  auto ref = leaf(init.clone());
  std::vector<ParamGroup> groups(1);
  groups[0].name = "decay";
  groups[0].params = {mine};
  groups[0].weight_decay = 0.1;
  AdamW opt(groups, {0.9, 0.95, 1e-8});
  torch::optim::AdamW topt({ref}, torch::optim::AdamWOptions(3e-3).betas({0.9, 0.95}).eps(1e-8).weight_decay(0.1));
  for (int t = 0; t < 6; ++t) {
    const auto g = torch::randn({5, 7});
    set_grad(mine, g.clone());
    set_grad(ref, g.clone());
    opt.step(3e-3);
    topt.step();
    ASSERT_TRUE(torch::allclose(mine, ref, 1e-6, 1e-7)) << "step " << t << " max diff "
                                                        << (mine - ref).abs().max().item<double>();
  }
}

// Two identical [R, C] tables: one with a dense optimizer, one row-sparse.
struct TablePair {
  torch::Tensor dense_p, sparse_p;
  std::unique_ptr<AdamW> dense, sparse;
  TablePair(int64_t R, int64_t C, double wd) {
    torch::manual_seed(2);
    const auto init = torch::randn({R, C});
    dense_p = leaf(init.clone());
    sparse_p = leaf(init.clone());
    std::vector<ParamGroup> gd(1), gs(1);
    gd[0] = {"memory_values", {dense_p}, {"values"}, 1.0, wd, false};
    gs[0] = {"memory_values", {sparse_p}, {"values"}, 1.0, wd, true};
    dense = std::make_unique<AdamW>(gd);
    sparse = std::make_unique<AdamW>(gs);
  }
  const train::AdamW& opt_of(bool sp) const { return sp ? *sparse : *dense; }
  torch::Tensor state(bool sp, const std::string& key) const {
    for (auto& [k, t] : opt_of(sp).state_tensors())
      if (k == "values." + key) return t.clone();
    return {};
  }
};

torch::Tensor row_sparse_grad(const std::vector<int64_t>& rows, const torch::Tensor& vals, int64_t R) {
  const auto idx = torch::tensor(rows, torch::kLong).unsqueeze(0);
  return torch::sparse_coo_tensor(idx, vals, {R, vals.size(1)});
}

TEST(AdamW, RowSparseEqualsDenseOnTouchedRowsAndLeavesOthers) {
  const int64_t R = 8, C = 4;
  TablePair tp(R, C, 0.1);
  torch::manual_seed(3);
  // Step 1 touches rows {1, 5}, step 2 rows {2, 5}.
  const std::vector<std::vector<int64_t>> touched = {{1, 5}, {2, 5}};
  for (int t = 0; t < 2; ++t) {
    const auto vals = torch::randn({2, C});
    const auto sg = row_sparse_grad(touched[t], vals, R).coalesce();
    const auto before_w = tp.sparse_p.detach().clone();
    const auto before_m = tp.state(true, "exp_avg");
    const auto before_v = tp.state(true, "exp_avg_sq");
    set_grad(tp.dense_p, sg.to_dense());
    set_grad(tp.sparse_p, sg);
    tp.dense->step(0.01);
    tp.sparse->step(0.01);
    const auto ws = tp.sparse_p.detach(), m = tp.state(true, "exp_avg"), v = tp.state(true, "exp_avg_sq");
    for (int64_t r = 0; r < R; ++r) {
      const bool hit = std::find(touched[t].begin(), touched[t].end(), r) != touched[t].end();
      if (hit && (t == 0 || r == 5)) {
        // Touched now and every previous step: identical history, identical result.
        EXPECT_TRUE(torch::equal(ws[r], tp.dense_p.detach()[r])) << "t=" << t << " row " << r;
        EXPECT_TRUE(torch::equal(m[r], tp.state(false, "exp_avg")[r])) << "t=" << t << " row " << r;
      } else if (!hit) {
        EXPECT_TRUE(torch::equal(ws[r], before_w[r])) << "untouched weights changed, t=" << t << " row " << r;
        EXPECT_TRUE(torch::equal(m[r], before_m[r])) << "untouched exp_avg changed, t=" << t << " row " << r;
        EXPECT_TRUE(torch::equal(v[r], before_v[r])) << "untouched exp_avg_sq changed, t=" << t << " row " << r;
      }
    }
    if (t == 1) {
      // Row 2 is touched for the first time at global step 2: bias corrections use t = 2.
      const auto g = vals[0].to(torch::kDouble);
      const auto w0 = before_w[2].to(torch::kDouble) * (1 - 0.01 * 0.1);
      const auto m2 = 0.1 * g, v2 = 0.05 * g * g;
      const auto expect = w0 - (0.01 / (1 - 0.81)) * m2 / (v2.sqrt() / std::sqrt(1 - 0.95 * 0.95) + 1e-8);
      EXPECT_TRUE(torch::allclose(ws[2].to(torch::kDouble), expect, 1e-6, 1e-7));
      // The dense optimizer decayed row 1's moments and weights; the sparse one did not.
      EXPECT_FALSE(torch::equal(tp.dense_p.detach()[1], ws[1]));
    }
  }
}

TEST(AdamW, RowSparseHandlesUncoalescedAndDenseGradients) {
  const int64_t R = 6, C = 3;
  // Uncoalesced: row 4 appears twice; the update must use the sum.
  TablePair a(R, C, 0.0);
  const auto v = torch::randn({3, C});
  const auto unco = row_sparse_grad({4, 0, 4}, v, R);
  ASSERT_FALSE(unco.is_coalesced());
  set_grad(a.sparse_p, unco);
  set_grad(a.dense_p, unco.to_dense());
  a.sparse->step(0.05);
  a.dense->step(0.05);
  EXPECT_TRUE(torch::equal(a.sparse_p.detach()[4], a.dense_p.detach()[4]));
  EXPECT_TRUE(torch::equal(a.sparse_p.detach()[0], a.dense_p.detach()[0]));
  EXPECT_TRUE(torch::allclose(a.state(true, "exp_avg")[4], (v[0] + v[2]) * 0.1, 1e-6, 1e-7));
  // Dense gradient in a row-sparse group: rows with any non-zero are touched, the others are not.
  TablePair b(R, C, 0.2);
  auto dg = torch::zeros({R, C});
  dg[1][2] = 0.5;
  dg[3] = torch::randn({C});
  const auto before = b.sparse_p.detach().clone();
  set_grad(b.sparse_p, dg);
  set_grad(b.dense_p, dg.clone());
  b.sparse->step(0.05);
  b.dense->step(0.05);
  for (int64_t r = 0; r < R; ++r) {
    if (r == 1 || r == 3)
      EXPECT_TRUE(torch::equal(b.sparse_p.detach()[r], b.dense_p.detach()[r])) << r;
    else
      EXPECT_TRUE(torch::equal(b.sparse_p.detach()[r], before[r])) << r;
  }
}

TEST(AdamW, StateRoundTripContinuesIdentically) {
  TablePair a(5, 3, 0.1), b(5, 3, 0.1);
  for (int t = 0; t < 3; ++t) {
    const auto g = row_sparse_grad({t % 5, 4}, torch::randn({2, 3}), 5);
    set_grad(a.sparse_p, g);
    a.sparse->step(0.01);
  }
  std::map<std::string, torch::Tensor> st;
  for (auto& [k, t] : a.sparse->state_tensors()) st[k] = t.clone();
  {
    torch::NoGradGuard ng;
    b.sparse_p.copy_(a.sparse_p);
  }
  b.sparse->load_state_tensors(st);
  EXPECT_EQ(b.sparse->step_count(), 3);
  const auto g = row_sparse_grad({0, 2}, torch::randn({2, 3}), 5);
  set_grad(a.sparse_p, g);
  set_grad(b.sparse_p, g);
  a.sparse->step(0.01);
  b.sparse->step(0.01);
  EXPECT_TRUE(torch::equal(a.sparse_p, b.sparse_p));
  // Errors name the key.
  auto missing = st;
  missing.erase("values.exp_avg");
  expect_throw_with<std::runtime_error>([&] { b.sparse->load_state_tensors(missing); }, {"values.exp_avg"});
  auto wrong = st;
  wrong["values.exp_avg_sq"] = torch::zeros({2, 3});
  expect_throw_with<std::runtime_error>([&] { b.sparse->load_state_tensors(wrong); }, {"values.exp_avg_sq", "[2, 3]"});
  auto extra = st;
  extra["other.exp_avg"] = torch::zeros({1});
  expect_throw_with<std::runtime_error>([&] { b.sparse->load_state_tensors(extra); }, {"other.exp_avg"});
}

TEST(AdamW, RejectsBadParameters) {
  std::vector<ParamGroup> g(1);
  g[0].name = "x";
  auto p = leaf(torch::zeros({3}));
  g[0].params = {p, p};
  expect_throw_with<std::invalid_argument>([&] { AdamW o(g); }, {"more than once"});
  g[0].params = {leaf(torch::zeros({3})), leaf(torch::zeros({4}))};
  g[0].param_names = {"a"};
  expect_throw_with<std::invalid_argument>([&] { AdamW o(g); }, {"2 parameters but 1 names"});
  expect_throw_with<std::invalid_argument>([&] { AdamW o({}, {0.9, 1.0, 1e-8}); }, {"beta2"});
  std::vector<ParamGroup> ok(1);
  ok[0].name = "y";
  auto q = leaf(torch::zeros({2, 3}));
  ok[0].params = {q};
  AdamW o(ok);
  set_grad(q, torch::zeros({3, 2}));
  expect_throw_with<std::invalid_argument>([&] { o.step(0.1); }, {"'y.0'", "[3, 2]"});
  EXPECT_EQ(o.step_count(), 0);  // nothing was updated
}

// ---------------------------------------------------------------------------------------------------
// Gradient clipping

TEST(GradClip, GlobalNormOverDenseAndUncoalescedSparse) {
  auto a = leaf(torch::zeros({2, 2}));
  auto b = leaf(torch::zeros({4, 2}));
  auto c = leaf(torch::zeros({3}));  // no gradient
  set_grad(a, torch::tensor({{3.0f, 0.0f}, {0.0f, 4.0f}}));
  // Row 1 twice: (1, 2) + (1, 0) = (2, 2); row 3: (0, 1). Squares: 4 + 4 + 1 = 9.
  set_grad(b, row_sparse_grad({1, 3, 1}, torch::tensor({{1.0f, 2.0f}, {0.0f, 1.0f}, {1.0f, 0.0f}}), 4));
  const double expect = std::sqrt(25.0 + 9.0);
  EXPECT_NEAR(train::grad_norm({a, b, c}), expect, 1e-6);
  const auto dense_b = b.grad().to_dense();
  EXPECT_NEAR(train::clip_grad_norm({a, b, c}, 100.0), expect, 1e-6);  // below the limit: unchanged
  EXPECT_TRUE(torch::equal(b.grad().to_dense(), dense_b));
  const double pre = train::clip_grad_norm({a, b, c}, 1.0);
  EXPECT_NEAR(pre, expect, 1e-6);
  EXPECT_NEAR(train::grad_norm({a, b, c}), 1.0, 1e-5);
  EXPECT_TRUE(torch::allclose(b.grad().to_dense(), dense_b / expect, 1e-5, 1e-6));
  EXPECT_TRUE(b.grad().is_sparse());
}

// ---------------------------------------------------------------------------------------------------
// Train config

TEST(TrainConfig, JsonRoundTripAndErrors) {
  train::TrainConfig c;
  c.lr = 1e-3;
  c.steps = 77;
  c.value_sparse_adam = false;
  c.out_dir = "somewhere";
  const auto j = train::train_config_to_json(c);
  const auto back = train::train_config_from_json(j);
  EXPECT_EQ(train::train_config_to_json(back), j);
  EXPECT_EQ(back.resolved_warmup_steps(), 1);  // 1% of 77, at least 1
  EXPECT_EQ(back.resolved_value_lr_decay_steps(), 77);
  expect_throw_with<std::invalid_argument>(
      [] { train::train_config_from_json(nlohmann::json{{"lr", 1e-3}, {"learning_rate", 1e-3}}); },
      {"unknown key", "learning_rate"});
  expect_throw_with<std::invalid_argument>(
      [] { train::train_config_from_json(nlohmann::json{{"steps", "ten"}}); }, {"steps", "integer"});
  expect_throw_with<std::invalid_argument>(
      [] { train::train_config_from_json(nlohmann::json{{"value_lr_T", 0.5}}); }, {"value_lr_T"});
  expect_throw_with<std::invalid_argument>(
      [] { train::train_config_from_json(nlohmann::json{{"grad_accum", 0}}); }, {"grad_accum"});
}

// ---------------------------------------------------------------------------------------------------
// The real model, tiny: 2 blocks, one UltraMem layer (64 physical rows, sparse value gradients),
// dropout on so that the RNG state matters for resume.

nn::ModelConfig tiny_model_config(uint64_t seed = 5) {
  nn::ModelConfig c;
  c.name = "tiny";
  c.vocab_size = 48;
  c.d_model = 32;
  c.n_layers = 2;
  c.n_heads = 2;
  c.max_seq_len = 16;
  c.ffn_hidden = 48;
  c.dropout = 0.1;
  c.ffn = {nn::FfnKind::Dense};
  c.memory_placement = nn::parse_placement("1:2", 2);
  c.ultramem.n = 16;
  c.ultramem.E = 4;
  c.ultramem.Dk = 8;
  c.ultramem.Dv = 16;
  c.ultramem.H = 2;
  c.ultramem.m = 4;
  c.ultramem.m_first = 6;
  c.ultramem.stats_window = 64;
  c.ultramem_sparse_value_grad = true;
  c.seed = seed;
  return c;
}

// Deterministic synthetic batches: batch k depends on k only (a tiny stand-in for data::BatchSampler).
struct SyntheticData {
  int64_t B, T, V, pos = 0;
  train::Batch make(int64_t k) const {
    auto gen = at::detail::createCPUGenerator(1000 + static_cast<uint64_t>(k));
    const auto x = torch::randint(V, {B, T + 1}, gen, torch::kLong);
    // A learnable pattern: every other token is a function of the previous one.
    auto seq = x.clone();
    seq.index_put_({torch::indexing::Slice(), torch::indexing::Slice(1, torch::indexing::None, 2)},
                   (x.index({torch::indexing::Slice(), torch::indexing::Slice(0, -1, 2)}) * 7 + 3) % V);
    return {seq.index({torch::indexing::Slice(), torch::indexing::Slice(0, T)}).contiguous(),
            seq.index({torch::indexing::Slice(), torch::indexing::Slice(1, T + 1)}).contiguous()};
  }
  train::BatchSource source() {
    return {[this] { return make(pos++); }, [this] { return pos; }, [this](int64_t k) { pos = k; }};
  }
};

train::TrainConfig tiny_train_config(const std::string& out_dir, int64_t steps) {
  train::TrainConfig c;
  c.lr = 3e-3;
  c.steps = steps;
  c.warmup_steps = 2;
  c.batch_size = 2;
  c.seq_len = 12;
  c.grad_accum = 2;
  c.value_lr_T = 4;
  c.eval_every = 3;
  c.eval_batches = 2;
  c.log_every = 2;
  c.checkpoint_every = 4;
  c.seed = 9;
  c.out_dir = out_dir;
  return c;
}

std::vector<train::Batch> eval_set(int64_t B, int64_t T, int64_t V) {
  SyntheticData d{B, T, V};
  return {d.make(-1), d.make(-2)};
}

std::vector<std::string> read_lines(const std::string& path) {
  std::ifstream in(path);
  std::vector<std::string> out;
  for (std::string line; std::getline(in, line);) out.push_back(line);
  return out;
}

TEST(Checkpoint, RoundTripWeightsOptimizerAndTrainerState) {
  TempDir dir("roundtrip");
  auto model = train::as_trainable(nn::Transformer(tiny_model_config()));
  SyntheticData data{2, 12, 48};
  train::Trainer tr(model, tiny_train_config(dir.str(), 3), data.source());
  tr.train_step();
  tr.train_step();
  const std::string path = dir.file("ckpt.safetensors");
  tr.save_checkpoint(path);

  const auto ck = checkpoint::read_checkpoint(path);
  EXPECT_EQ(ck.model_config, model->config_json());
  EXPECT_EQ(ck.train_config, train::train_config_to_json(tr.config()));
  EXPECT_EQ(ck.trainer_state.at("step").get<int64_t>(), 2);
  EXPECT_EQ(ck.trainer_state.at("data_position").get<int64_t>(), 4);  // 2 steps x 2 micro-batches
  EXPECT_EQ(ck.trainer_state.at("tokens_seen").get<int64_t>(), 2 * 2 * 2 * 12);
  ASSERT_TRUE(ck.rng.defined());
  for (const auto& p : model->module().named_parameters()) {
    ASSERT_TRUE(ck.model.count(p.key())) << p.key();
    EXPECT_TRUE(torch::equal(ck.model.at(p.key()), p.value().detach())) << p.key();
  }
  for (const auto& b : model->module().named_buffers()) {
    ASSERT_TRUE(ck.model.count(b.key())) << b.key();
    EXPECT_TRUE(torch::equal(ck.model.at(b.key()), b.value())) << b.key();
  }
  for (const auto& [k, t] : tr.optimizer().state_tensors()) {
    ASSERT_TRUE(ck.optim.count(k)) << k;
    EXPECT_TRUE(torch::equal(ck.optim.at(k), t)) << k;
  }
  EXPECT_EQ(ck.optim.at("step").item<int64_t>(), 2);

  // Weights only, into a model of the same config whose weights were changed.
  auto other = train::as_trainable(nn::Transformer(tiny_model_config()));
  {
    torch::NoGradGuard ng;
    for (auto& p : other->module().parameters()) p.add_(1.0);
  }
  checkpoint::load_model_weights(path, other->module(), other->config_json());
  for (const auto& p : other->module().named_parameters())
    EXPECT_TRUE(torch::equal(p.value(), ck.model.at(p.key()))) << p.key();
}

TEST(Checkpoint, CorruptTruncatedAndWrongConfigAreClearErrors) {
  TempDir dir("corrupt");
  auto model = train::as_trainable(nn::Transformer(tiny_model_config()));
  const std::string path = dir.file("c.safetensors");
  checkpoint::save_checkpoint(path, model->module(), model->config_json());
  ASSERT_NO_THROW(checkpoint::read_checkpoint(path));
  const auto size = fs::file_size(path);

  // One flipped byte near the end (inside the tensor data).
  const std::string bad = dir.file("bad.safetensors");
  fs::copy_file(path, bad);
  {
    std::fstream f(bad, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(static_cast<std::streamoff>(size - 10));
    char ch;
    f.read(&ch, 1);
    ch = static_cast<char>(ch ^ 0x5a);
    f.seekp(static_cast<std::streamoff>(size - 10));
    f.write(&ch, 1);
  }
  expect_throw_with<std::runtime_error>([&] { checkpoint::read_checkpoint(bad); }, {bad, "checksum"});

  // Truncated.
  const std::string cut = dir.file("cut.safetensors");
  fs::copy_file(path, cut);
  fs::resize_file(cut, size / 2);
  expect_throw_with<std::runtime_error>([&] { checkpoint::read_checkpoint(cut); }, {cut});
  fs::resize_file(cut, 5);
  expect_throw_with<std::runtime_error>([&] { checkpoint::read_checkpoint(cut); }, {cut});
  expect_throw_with<std::runtime_error>([&] { checkpoint::read_checkpoint(dir.file("absent.safetensors")); },
                                        {"absent.safetensors"});

  // Another model config: the differing keys are listed.
  auto cfg = tiny_model_config();
  cfg.d_model = 16;
  cfg.ffn_hidden = 40;
  auto other = train::as_trainable(nn::Transformer(cfg));
  expect_throw_with<std::runtime_error>(
      [&] { checkpoint::load_model_weights(path, other->module(), other->config_json()); },
      {path, "model config differs", "d_model", "ffn_hidden"});
}

// zlib's crc32 returns its initial value for a null buffer, so an empty tensor used to restart the
// checksum and a corrupt byte in any tensor stored before it went unnoticed.
TEST(Checkpoint, EmptyTensorDoesNotResetTheChecksum) {
  TempDir dir("empty");
  auto model = train::as_trainable(nn::Transformer(tiny_model_config()));
  const std::string path = dir.file("c.safetensors");
  checkpoint::save_checkpoint(path, model->module(), model->config_json());
  auto ck = checkpoint::read_checkpoint(path);
  ck.model["zzz_empty"] = torch::empty({0});
  const std::string with_empty = dir.file("e.safetensors");
  checkpoint::save_checkpoint(with_empty, ck);
  ASSERT_NO_THROW(checkpoint::read_checkpoint(with_empty));
  // The data region of the tensor stored just before the empty one (safetensors: an 8-byte header length,
  // the JSON header, then the data; data_offsets relative to its start).
  std::ifstream in(with_empty, std::ios::binary);
  uint64_t header_len = 0;
  in.read(reinterpret_cast<char*>(&header_len), 8);
  std::string header(header_len, '\0');
  in.read(header.data(), static_cast<std::streamsize>(header_len));
  in.close();
  const auto h = nlohmann::json::parse(header);
  ASSERT_TRUE(h.contains("model.zzz_empty"));
  const int64_t empty_at = h["model.zzz_empty"]["data_offsets"][0];
  int64_t begin = -1, end = -1;
  for (const auto& [name, e] : h.items()) {
    if (name == "__metadata__") continue;
    const int64_t b = e["data_offsets"][0], en = e["data_offsets"][1];
    if (en <= empty_at && en > b && en > end) begin = b, end = en;
  }
  ASSERT_GE(begin, 0) << "no tensor with data is stored before the empty one";
  {
    std::fstream f(with_empty, std::ios::in | std::ios::out | std::ios::binary);
    const auto at = static_cast<std::streamoff>(8 + header_len + uint64_t(begin + end) / 2);
    f.seekg(at);
    char ch;
    f.read(&ch, 1);
    ch = static_cast<char>(ch ^ 0x21);
    f.seekp(at);
    f.write(&ch, 1);
  }
  expect_throw_with<std::runtime_error>([&] { checkpoint::read_checkpoint(with_empty); }, {with_empty, "checksum"});
}

// A sharded checkpoint's manifest names plain files next to the main file; a name with a folder or ".."
// is refused before anything is read.
TEST(Checkpoint, ShardManifestNamesCannotLeaveTheFolder) {
  TempDir dir("manifest");
  auto model = train::as_trainable(nn::Transformer(tiny_model_config()));
  for (const std::string name : {"../evil.safetensors", "/etc/passwd", "sub/x.safetensors", "..", ""}) {
    SCOPED_TRACE(name);
    checkpoint::CheckpointWriteOptions o;
    o.shards = {{"world", 1},
                {"step", 1},
                {"files", {{{"file", name}, {"checksum", "crc32:00000000"}}}},
                {"tensors", nlohmann::json::object()}};
    const std::string path = dir.file("m.safetensors");
    checkpoint::save_checkpoint(path, model->module(), model->config_json(), o);
    expect_throw_with<std::runtime_error>([&] { checkpoint::read_checkpoint(path); },
                                          {path, "not a plain file name"});
  }
}

TEST(Checkpoint, InterruptedWriteLeavesPreviousCheckpointIntact) {
  TempDir dir("atomic");
  auto model = train::as_trainable(nn::Transformer(tiny_model_config()));
  const std::string path = dir.file("checkpoint.safetensors");
  checkpoint::save_checkpoint(path, model->module(), model->config_json());
  const auto first = checkpoint::read_checkpoint(path);

  // A crash mid-write leaves a partial temporary file next to the checkpoint.
  {
    std::ofstream stray(path + ".tmp.424242", std::ios::binary);
    stray << "partial garbage";
  }
  // A write that fails (its temporary path is blocked by a directory) must not touch the file either.
  {
    torch::NoGradGuard ng;
    for (auto& p : model->module().parameters()) p.mul_(2.0);
  }
  fs::create_directories(path + ".tmp." + std::to_string(::getpid()));
  EXPECT_THROW(checkpoint::save_checkpoint(path, model->module(), model->config_json()), std::runtime_error);
  const auto again = checkpoint::read_checkpoint(path);
  for (const auto& [k, t] : first.model) EXPECT_TRUE(torch::equal(again.model.at(k), t)) << k;
  // And once the obstacle is gone, the next write replaces it.
  fs::remove_all(path + ".tmp." + std::to_string(::getpid()));
  checkpoint::save_checkpoint(path, model->module(), model->config_json());
  const auto third = checkpoint::read_checkpoint(path);
  const auto name = model->module().named_parameters().begin()->key();
  EXPECT_TRUE(torch::equal(third.model.at(name), first.model.at(name) * 2.0));
}

// A kill during a save leaves a full-size temporary; the next save removes those of dead processes and
// leaves a live process's alone.
TEST(Checkpoint, NextSaveRemovesTemporariesOfDeadProcesses) {
  TempDir dir("stale");
  auto model = train::as_trainable(nn::Transformer(tiny_model_config()));
  const std::string path = dir.file("checkpoint.safetensors");
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) ::_exit(0);
  ASSERT_EQ(::waitpid(child, nullptr, 0), child);  // a pid that no longer runs
  const std::string dead = path + ".tmp." + std::to_string(child);
  const std::string live = path + ".tmp." + std::to_string(::getppid());
  const std::string other = dir.file("other.safetensors.tmp." + std::to_string(child));
  for (const auto& f : {dead, live, other}) std::ofstream(f, std::ios::binary) << "partial";
  checkpoint::save_checkpoint(path, model->module(), model->config_json());
  EXPECT_FALSE(fs::exists(dead));
  EXPECT_TRUE(fs::exists(live));
  EXPECT_TRUE(fs::exists(other));  // another file's temporary is not this save's business
  ASSERT_NO_THROW(checkpoint::read_checkpoint(path));
}

// ---------------------------------------------------------------------------------------------------
// Trainer

// Runs `steps` optimizer steps (or resumes from `resume_from` and finishes), recording losses.
struct RunResult {
  std::vector<double> losses;  // per step, in step order
  std::map<std::string, torch::Tensor> weights;
  train::TrainerState state;
};

RunResult run_tiny(const std::string& out_dir, int64_t steps, int64_t stop_at, const std::string& resume_from) {
  auto model = train::as_trainable(nn::Transformer(tiny_model_config()));
  SyntheticData data{2, 12, 48};
  train::Trainer tr(model, tiny_train_config(out_dir, steps), data.source(), eval_set(2, 12, 48));
  if (!resume_from.empty()) tr.resume(resume_from);
  RunResult r;
  tr.on_step = [&](const train::StepStats& s) { r.losses.push_back(s.loss); };
  r.state = tr.run(stop_at);
  for (const auto& p : model->module().named_parameters()) r.weights[p.key()] = p.value().detach().clone();
  for (const auto& b : model->module().named_buffers()) r.weights[b.key()] = b.value().clone();
  return r;
}

TEST(Trainer, ResumeIsExact) {
  TempDir a("straight"), b("split");
  const int64_t k = 5;
  const RunResult straight = run_tiny(a.str(), 2 * k, -1, "");
  ASSERT_EQ(straight.losses.size(), size_t(2 * k));
  const RunResult first = run_tiny(b.str(), 2 * k, k, "");
  ASSERT_EQ(first.losses.size(), size_t(k));
  EXPECT_EQ(first.state.step, k);
  const RunResult second = run_tiny(b.str(), 2 * k, -1, b.file("checkpoint.safetensors"));
  ASSERT_EQ(second.losses.size(), size_t(k));
  for (int64_t i = 0; i < k; ++i) {
    EXPECT_EQ(first.losses[i], straight.losses[i]) << "step " << i + 1;
    EXPECT_EQ(second.losses[i], straight.losses[k + i]) << "step " << k + i + 1;  // bit-identical
  }
  for (const auto& [name, t] : straight.weights) EXPECT_TRUE(torch::equal(second.weights.at(name), t)) << name;
  EXPECT_EQ(second.state.tokens_seen, straight.state.tokens_seen);
  EXPECT_EQ(second.state.best_val_loss, straight.state.best_val_loss);
  EXPECT_LT(straight.losses.back(), straight.losses.front());  // it learns something

  // Metrics: train records with the documented fields, eval records, a resume marker.
  int train_lines = 0, eval_lines = 0;
  bool resume_marker = false;
  for (const auto& line : read_lines(b.file("metrics.jsonl"))) {
    const auto j = nlohmann::json::parse(line);
    const auto ev = j.at("event").get<std::string>();
    if (ev == "train") {
      ++train_lines;
      for (const char* key : {"loss", "ce", "aux", "lr", "value_lr_mult", "grad_norm", "tokens_per_s", "telemetry"})
        EXPECT_TRUE(j.contains(key)) << key;
      EXPECT_TRUE(j.at("telemetry").contains("mem0.coverage"));
      EXPECT_TRUE(j.at("aux").contains("tucker"));
      EXPECT_GE(j.at("value_lr_mult").get<double>(), 1.0);
    } else if (ev == "eval") {
      ++eval_lines;
      EXPECT_TRUE(std::isfinite(j.at("val_loss").get<double>()));
    } else if (ev == "resume") {
      resume_marker = true;
      EXPECT_EQ(j.at("step").get<int64_t>(), k);
    }
  }
  EXPECT_EQ(train_lines, 3 + 3);  // log_every 2: steps 2, 4, 5 (stop) | 6, 8, 10
  EXPECT_EQ(eval_lines, 4);       // eval_every 3: steps 3 | 6, 9 and the end (10)
  EXPECT_TRUE(resume_marker);
  EXPECT_TRUE(fs::exists(b.file("best.safetensors")));
}

TEST(Trainer, ResumeRejectsOtherTrajectoryConfigAndWeightsOnlyFiles) {
  TempDir dir("reject");
  run_tiny(dir.str(), 4, 3, "");  // evaluates at step 3: writes best.safetensors
  auto model = train::as_trainable(nn::Transformer(tiny_model_config()));
  SyntheticData data{2, 12, 48};
  auto cfg = tiny_train_config(dir.str(), 4);
  cfg.lr = 1e-2;
  cfg.grad_accum = 1;
  train::Trainer tr(model, cfg, data.source(), eval_set(2, 12, 48));
  expect_throw_with<std::invalid_argument>([&] { tr.resume(dir.file("checkpoint.safetensors")); },
                                           {"lr", "grad_accum"});
  train::Trainer tr2(model, tiny_train_config(dir.str(), 4), data.source());
  ASSERT_TRUE(fs::exists(dir.file("best.safetensors")));
  expect_throw_with<std::runtime_error>([&] { tr2.resume(dir.file("best.safetensors")); },
                                        {"best.safetensors", "no optimizer state"});
}

TEST(Trainer, ExpertLrMultiplierScalesOnlyTheExperts) {
  // One step from the same weights with expert_lr_T 1 and 10: AdamW's first update is lr * mult * (sign-like
  // step + decay), so the experts move 10x as far and every other parameter the same.
  auto mc = tiny_model_config();
  mc.dropout = 0.0;
  mc.ffn = {nn::FfnKind::MoE};
  mc.moe.num_experts = 4;
  std::map<std::string, torch::Tensor> before, moved[2];
  for (int run = 0; run < 2; ++run) {
    TempDir dir("expert_lr" + std::to_string(run));
    auto model = train::as_trainable(nn::Transformer(mc));
    if (run == 0)
      for (const auto& p : model->module().named_parameters()) before[p.key()] = p.value().detach().clone();
    SyntheticData data{2, 12, 48};
    auto cfg = tiny_train_config(dir.str(), 4);
    cfg.expert_lr_T = run == 0 ? 1.0 : 10.0;
    cfg.warmup_steps = 0;
    cfg.grad_clip = 0;
    train::Trainer tr(model, cfg, data.source());
    tr.train_step();
    for (const auto& p : model->module().named_parameters()) moved[run][p.key()] = p.value().detach() - before[p.key()];
  }
  int experts = 0;
  for (const auto& [name, d0] : moved[0]) {
    const double a = d0.abs().sum().item<double>(), b = moved[1].at(name).abs().sum().item<double>();
    if (a == 0) continue;
    const bool expert = name.find(".moe.w_") != std::string::npos;
    experts += expert;
    EXPECT_NEAR(b / a, expert ? 10.0 : 1.0, expert ? 0.05 : 1e-6) << name;
  }
  EXPECT_EQ(experts, 4);  // w_in and w_out of 2 blocks
  auto bad = tiny_train_config("x", 4);
  bad.expert_lr_T = 0.5;
  expect_throw_with<std::invalid_argument>([&] { bad.validate(); }, {"expert_lr_T"});
}

TEST(Trainer, GradAccumulationMatchesOneLargeBatch) {
  // grad_accum = 2 micro-batches of 2 sequences == 1 batch of 4 (dropout off), up to float rounding.
  auto cfg = tiny_model_config();
  cfg.dropout = 0.0;
  cfg.ultramem.aux_loss = false;  // the aux loss is per forward, so it would be counted once vs twice
  auto m1 = train::as_trainable(nn::Transformer(cfg));
  auto m2 = train::as_trainable(nn::Transformer(cfg));
  SyntheticData small{2, 12, 48};
  const auto b0 = small.make(0), b1 = small.make(1);
  const train::Batch big{torch::cat({b0.inputs, b1.inputs}), torch::cat({b0.targets, b1.targets})};
  TempDir dir("accum");
  auto tc = tiny_train_config(dir.str(), 3);
  tc.grad_clip = 0.5;
  train::Trainer t1(m1, tc, small.source());
  tc.grad_accum = 1;
  tc.batch_size = 4;
  train::Trainer t2(m2, tc, {[&] { return big; }});
  const auto s1 = t1.train_step();
  const auto s2 = t2.train_step();
  EXPECT_NEAR(s1.loss, s2.loss, 1e-5);
  EXPECT_NEAR(s1.grad_norm, s2.grad_norm, 1e-4 * s2.grad_norm);
  EXPECT_EQ(s1.value_lr_mult, 4.0);
  for (const auto& p : m1->module().named_parameters()) {
    const auto q = m2->module().named_parameters()[p.key()];
    EXPECT_TRUE(torch::allclose(p.value(), q, 1e-4, 1e-5)) << p.key();
  }
}

// A module whose param_groups() forget one parameter.
struct BadGroups : train::TrainableModel {
  torch::nn::Module mod;
  torch::Tensor a, b;
  BadGroups() {
    a = mod.register_parameter("a", torch::zeros({2, 2}));
    b = mod.register_parameter("b", torch::zeros({2}));
  }
  torch::Tensor forward(const torch::Tensor& t) override { return t; }
  std::map<std::string, torch::Tensor> aux_losses() override { return {}; }
  void after_optimizer_step() override {}
  nn::ParamGroups param_groups() override { return {{a}, {}, {}}; }
  nlohmann::json telemetry() override { return nlohmann::json::object(); }
  nlohmann::json config_json() const override { return nlohmann::json::object(); }
  torch::nn::Module& module() override { return mod; }
};

TEST(Trainer, RejectsIncompleteParamGroupsAndMissingSource) {
  TempDir dir("groups");
  expect_throw_with<std::invalid_argument>(
      [&] { train::Trainer t(std::make_shared<BadGroups>(), tiny_train_config(dir.str(), 2), {[] { return train::Batch{}; }}); },
      {"'b'", "no parameter group"});
  expect_throw_with<std::invalid_argument>(
      [&] { train::Trainer t(std::make_shared<BadGroups>(), tiny_train_config(dir.str(), 2), {}); }, {"next()"});
}

}  // namespace
