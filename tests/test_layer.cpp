// Tests of the memory layers: gradients of every parameter in double precision, determinism,
// sparse value gradients, the rank-1 refresh, aux loss, telemetry and configuration errors.
#include <gtest/gtest.h>
#include <omp.h>
#include <torch/torch.h>

#include <cmath>
#include <stdexcept>
#include <string>

#include "expect_throw.h"
#include "grad_check.h"
#include "ultramem/nn/engram.h"
#include "ultramem/nn/pkm.h"
#include "ultramem/nn/ultramem.h"
#include "ultramem/ops/engram_decode.h"
#include "ultramem/ops/runtime.h"

using ultramem::nn::NormKind;
using ultramem::nn::PKM;
using ultramem::nn::PKMConfig;
using ultramem::nn::UltraMem;
using ultramem::nn::RetrievalFilter;
using ultramem::nn::UltraMemConfig;
using ultramem::testing::expect_grad_matches;

namespace {

UltraMemConfig small_config() {
  UltraMemConfig c;
  c.D = 24;
  c.n = 8;
  c.E = 4;
  c.Dk = 12;
  c.Dv = 16;
  c.r = 2;
  c.C = 2;
  c.H = 2;
  c.m = 5;
  c.m_first = 6;
  c.seed = 3;
  return c;
}

// Checks d/dθ of loss(x) for the input x [3, 4, D] and every parameter of `layer`, in double precision.
template <typename Module, typename Loss>
void check_gradients_of(Module& layer, int64_t D, const Loss& loss /* (x) -> scalar */) {
  layer->to(torch::kDouble);
  torch::manual_seed(11);
  auto x = torch::randn({3, 4, D}, torch::kDouble).requires_grad_(true);
  auto loss_fn = [&]() { return loss(x); };
  layer->zero_grad();
  loss_fn().backward();
  expect_grad_matches(loss_fn, x.detach(), x.grad(), "x");
  for (auto& p : layer->named_parameters()) {
    expect_grad_matches(loss_fn, p.value().detach(), p.value().grad(), p.key());
  }
}

// The same for (out · g).sum() + aux with out = layer(x).
template <typename Module>
void check_all_gradients(Module& layer, int64_t D, bool with_aux) {
  torch::manual_seed(12);
  const auto g = torch::randn({3, 4, D}, torch::kDouble);
  check_gradients_of(layer, D, [&](const torch::Tensor& x) {
    torch::Tensor l = (layer->forward(x) * g).sum();
    if constexpr (std::is_same_v<Module, UltraMem>) {
      if (with_aux) l = l + layer->aux_loss();
    }
    return l;
  });
}

}  // namespace

TEST(UltraMemLayer, GradientsOfEveryParameterDouble) {
  UltraMem layer(small_config());
  check_all_gradients(layer, 24, /*with_aux=*/false);
}

TEST(UltraMemLayer, GradientsWithLayerNormAuxLossAndSingleHead) {
  auto c = small_config();
  c.qk_norm = NormKind::Layer;
  c.H = 1;
  c.C = 1;
  c.r = 3;
  c.E = 1;
  c.m_first = 8;
  UltraMem layer(c);
  {  // make the second singular value exceed tau, so the aux loss has a gradient
    torch::NoGradGuard ng;
    layer->cores.copy_(torch::tensor({1.0, 0.3, 0.0, 0.2, 0.9, 0.1, 0.0, 0.4, 0.7}).view({1, 1, 3, 3}));
  }
  layer->refresh_tucker_approx();
  EXPECT_GT(layer->aux_loss().item<double>(), 0.0);
  check_all_gradients(layer, c.D, /*with_aux=*/true);
}

TEST(UltraMemLayer, SameSeedSameResultDifferentSeedDifferent) {
  torch::manual_seed(0);
  const auto x = torch::randn({7, 24});
  UltraMem a(small_config()), b(small_config());
  auto c2 = small_config();
  c2.seed = 4;
  UltraMem c(c2);
  EXPECT_TRUE(torch::equal(a->forward(x), b->forward(x)));
  EXPECT_TRUE(torch::equal(a->perm, b->perm));
  EXPECT_FALSE(torch::equal(a->perm, c->perm));
  EXPECT_FALSE(torch::allclose(a->forward(x), c->forward(x)));
}

TEST(UltraMemLayer, PermutationIsAPermutationAndStaysInt64) {
  UltraMem layer(small_config());
  layer->to(torch::kDouble);
  ASSERT_EQ(layer->perm.scalar_type(), torch::kLong);
  EXPECT_TRUE(torch::equal(std::get<0>(layer->perm.sort()), torch::arange(64, torch::kLong)));
  EXPECT_EQ(layer->values.scalar_type(), torch::kDouble);
}

TEST(UltraMemLayer, ValueGradientIdenticalWithOneAndTwoThreads) {
  auto c = small_config();
  c.n = 32;
  c.m = 8;
  c.m_first = 8;
  // The thread count of our kernels and of libtorch's own loops (OpenMP) varies; OpenBLAS keeps the
  // count set_threads gave it. On some CPUs OpenBLAS's sgemm rounds differently with 1 and 2 threads
  // (measured here: [300, 12] x [12, 256] and [300, 64] x [64, 24] products differ in the last bits),
  // which changes the forward and so every gradient: a property of the BLAS, not of the layer.
  auto run = [&](int threads) {
    ultramem::set_threads(2);
    omp_set_num_threads(threads);
    UltraMem layer(c);
    torch::manual_seed(5);
    const auto x = torch::randn({300, c.D});
    layer->forward(x).pow(2).sum().backward();
    auto grads = std::make_pair(layer->values.grad().clone(), layer->cores.grad().clone());
    ultramem::set_threads(0);
    return grads;
  };
  const auto one = run(1), two = run(2);
  EXPECT_TRUE(torch::equal(one.first, two.first)) << "value gradient depends on the thread count";
  EXPECT_TRUE(torch::allclose(one.second, two.second, 1e-5, 1e-6));
}

TEST(UltraMemLayer, SparseValueGradientEqualsDense) {
  auto c = small_config();
  torch::manual_seed(9);
  const auto x = torch::randn({6, c.D});
  UltraMem dense(c);
  c.sparse_value_grad = true;
  UltraMem sparse(c);
  dense->forward(x).sum().backward();
  sparse->forward(x).sum().backward();
  ASSERT_TRUE(sparse->values.grad().is_sparse());
  EXPECT_FALSE(dense->values.grad().is_sparse());
  const auto sg = sparse->values.grad();
  EXPECT_LE(sg._nnz(), 6 * c.H * c.m);  // only rows hit are stored
  EXPECT_TRUE(torch::allclose(sg.to_dense(), dense->values.grad()));
  EXPECT_TRUE(torch::allclose(sparse->wq.grad(), dense->wq.grad()));
}

TEST(UltraMemLayer, RefreshFindsTopSingularVectorsWithSignContinuity) {
  UltraMem layer(small_config());
  const auto csum = layer->cores.detach().sum(0).to(torch::kDouble);  // [H, r, r]
  auto [U, S, Vh] = torch::linalg_svd(csum, false);
  for (int64_t h = 0; h < 2; ++h) {
    const double cu = torch::dot(layer->u_vec[h].to(torch::kDouble), U[h].select(1, 0)).item<double>();
    const double cv = torch::dot(layer->v_vec[h].to(torch::kDouble), Vh[h][0]).item<double>();
    EXPECT_NEAR(std::abs(cu), 1.0, 1e-6);
    EXPECT_NEAR(cu, cv, 1e-6);  // u and v flip together
    // cores are positive, so the first orientation is the positive one
    EXPECT_GT(layer->u_vec[h].sum().item<double>(), 0.0);
  }
  // With the previous (u, v) negated, the refresh keeps the negated orientation.
  {
    torch::NoGradGuard ng;
    layer->u_vec.neg_();
    layer->v_vec.neg_();
  }
  const auto before = layer->u_vec.clone();
  layer->refresh_tucker_approx();
  EXPECT_TRUE(torch::allclose(layer->u_vec, before, 1e-5, 1e-6));
  EXPECT_LT(layer->u_vec.sum().item<double>(), 0.0);
}

TEST(UltraMemLayer, AuxLossMatchesFormulaAndSwitch) {
  auto c = small_config();
  c.H = 1;
  c.C = 1;
  UltraMem layer(c);
  {
    torch::NoGradGuard ng;
    layer->cores.copy_(torch::tensor({2.0f, 0.0f, 0.0f, 0.65f}).view({1, 1, 2, 2}));
  }
  // singular values 2 and 0.65: alpha/(r-1) * (0.65 - 0.15)^2
  EXPECT_NEAR(layer->aux_loss().item<double>(), 0.001 * 0.25, 1e-7);
  c.aux_loss = false;
  UltraMem off(c);
  EXPECT_EQ(off->aux_loss().item<double>(), 0.0);
  // Two heads, singular values (2, 0.65) and (2, 0.35): mean over heads by default, sum on request.
  c = small_config();
  c.H = 2;
  c.C = 1;
  for (auto red : {ultramem::nn::AuxReduction::kMean, ultramem::nn::AuxReduction::kSum}) {
    c.aux_reduction = red;
    UltraMem two(c);
    {
      torch::NoGradGuard ng;
      two->cores.copy_(torch::tensor({2.0f, 0.0f, 0.0f, 0.65f, 2.0f, 0.0f, 0.0f, 0.35f}).view({1, 2, 2, 2}));
    }
    const double sum = 0.001 * (0.25 + 0.04);
    EXPECT_NEAR(two->aux_loss().item<double>(), red == ultramem::nn::AuxReduction::kMean ? sum / 2 : sum, 1e-7);
  }
  EXPECT_EQ(UltraMemConfig{}.aux_reduction, ultramem::nn::AuxReduction::kMean);
}

TEST(UltraMemLayer, TelemetryIsConsistent) {
  auto c = small_config();
  c.stats_window = 1000000;
  UltraMem layer(c);
  torch::manual_seed(1);
  layer->forward(torch::randn({40, c.D}));
  const auto s = layer->stats();
  EXPECT_EQ(s.tokens, 40);
  EXPECT_GT(s.coverage, 0.0);
  EXPECT_LE(s.coverage, 1.0);
  EXPECT_GE(s.kl_uniform, 0.0);
  EXPECT_LE(s.kl_uniform, std::log(64.0) + 1e-9);
  EXPECT_GE(s.top1_score, s.topm_score);  // the best of each head is at least the mean
  EXPECT_GT(s.output_std, 0.0);
  EXPECT_GE(s.core_l1, s.core_l2);
  layer->reset_stats();
  EXPECT_EQ(layer->stats().tokens, 0);
  // A window closes after stats_window tokens and stays readable.
  c.stats_window = 10;
  UltraMem w(c);
  w->forward(torch::randn({12, c.D}));
  EXPECT_EQ(w->stats().tokens, 12);
}

// Retrieval telemetry: recall of the exact top-m and score mass, on the first retrieval_sample tokens
// of a window, the same from the autograd and the fused path.
TEST(UltraMemLayer, RetrievalTelemetry) {
  auto c = small_config();
  c.stats_window = 1000000;
  c.retrieval_sample = 30;
  torch::manual_seed(5);
  const auto x = torch::randn({40, c.D});
  for (bool fused : {false, true}) {
    SCOPED_TRACE(fused ? "fused path" : "autograd path");
    // m_first = n: the filter keeps the whole grid, retrieval is exact.
    auto all = c;
    all.m_first = all.n;
    UltraMem exact(all);
    {
      torch::AutoGradMode mode(!fused);
      exact->forward(x);
    }
    auto s = exact->stats();
    EXPECT_EQ(s.retrieval_tokens, 30);
    EXPECT_DOUBLE_EQ(s.recall, 1.0);
    EXPECT_NEAR(s.score_mass, 1.0, 1e-6);
    // The paper's filter and the two-sign filter with fewer candidates: recall in [0, 1], mass <= 1
    // (the exact top-m has the largest sum of any m slots).
    for (auto filter : {RetrievalFilter::kRank1, RetrievalFilter::kTwoSign, RetrievalFilter::kRankR}) {
      auto f = c;
      f.m_first = 4;
      f.filter = filter;
      UltraMem layer(f);
      {
        torch::AutoGradMode mode(!fused);
        layer->forward(x);
      }
      s = layer->stats();
      EXPECT_EQ(s.retrieval_tokens, 30);
      EXPECT_GE(s.recall, 0.0);
      EXPECT_LE(s.recall, 1.0);
      EXPECT_LE(s.score_mass, 1.0 + 1e-6);
    }
    // Off: NaN, no token checked.
    auto off = c;
    off.retrieval_sample = 0;
    UltraMem none(off);
    {
      torch::AutoGradMode mode(!fused);
      none->forward(x);
    }
    EXPECT_EQ(none->stats().retrieval_tokens, 0);
    EXPECT_TRUE(std::isnan(none->stats().recall));
  }
}

// set_filter switches the first stage of a built layer (evaluation with another filter); an invalid
// split is refused naming the field and leaves the layer as it was.
TEST(UltraMemLayer, SetFilterSwitchesTheFirstStage) {
  auto c = small_config();
  c.stats_window = 1000000;
  c.retrieval_sample = 100;
  UltraMem layer(c);
  torch::manual_seed(9);
  const auto x = torch::randn({20, c.D});
  const auto before = layer->forward(x).detach();
  layer->set_filter(RetrievalFilter::kTwoSign, 3);
  EXPECT_EQ(layer->config().filter, RetrievalFilter::kTwoSign);
  EXPECT_EQ(layer->config().filter_negatives(), 3);
  layer->reset_stats();
  const auto two = layer->forward(x).detach();
  EXPECT_EQ(two.sizes(), before.sizes());
  EXPECT_GE(layer->stats().recall, 0.0);
  expect_throw_with<std::invalid_argument>([&] { layer->set_filter(RetrievalFilter::kTwoSign, 6); }, "m_neg");
  EXPECT_EQ(layer->config().filter_negatives(), 3);
  // The rank-R filter: its vectors come from the cores' SVD, [H, R, r]; an R above r is refused.
  layer->set_filter(RetrievalFilter::kRankR, 0, 0, 2);
  EXPECT_EQ(layer->config().filter_vectors(), 2);
  const auto [fu, fv] = layer->filter_vectors();
  EXPECT_EQ(fu.sizes(), (std::vector<int64_t>{c.H, 2, c.r}));
  EXPECT_EQ(fv.sizes(), fu.sizes());
  // sum_k u_k v_k^T rebuilds each head's core sum (R = r).
  const auto rebuilt = torch::einsum("hka,hkb->hab", {fu.to(torch::kDouble), fv.to(torch::kDouble)});
  EXPECT_TRUE(torch::allclose(rebuilt, layer->cores.detach().sum(0).to(torch::kDouble), 1e-5, 1e-6));
  {
    torch::NoGradGuard no_grad;  // the fused path with the rank-R filter keys against the autograd path
    const auto fused = layer->forward(x);
    torch::AutoGradMode on(true);
    const auto plain = layer->forward(x).detach();
    EXPECT_TRUE(torch::allclose(fused, plain, 1e-5, 1e-6));
  }
  expect_throw_with<std::invalid_argument>([&] { layer->set_filter(RetrievalFilter::kRankR, 0, 0, 3); },
                                           "filter_rank");  // R = 3 > r = 2
  layer->set_filter(RetrievalFilter::kRank1, 0);
  EXPECT_TRUE(torch::equal(layer->forward(x).detach(), before));
}

TEST(UltraMemLayer, InvalidConfigNamesTheField) {
  struct Case {
    std::function<void(UltraMemConfig&)> edit;
    std::string field;
  };
  const std::vector<Case> cases = {
      {[](UltraMemConfig& c) { c.E = 3; }, "E"},
      {[](UltraMemConfig& c) { c.E = 0; }, "E"},
      {[](UltraMemConfig& c) { c.Dv = 15; }, "Dv"},
      {[](UltraMemConfig& c) { c.m = 65; c.m_first = 8; }, "m"},
      {[](UltraMemConfig& c) { c.m_first = 2; }, "m_first"},  // m_first^2 < m
      {[](UltraMemConfig& c) { c.m_first = 9; }, "m_first"},
      {[](UltraMemConfig& c) { c.D = 0; }, "D"},
      {[](UltraMemConfig& c) { c.n = 0; }, "n"},
      {[](UltraMemConfig& c) { c.n = 9; }, "n"},  // not a multiple of sqrt(E) = 2
      {[](UltraMemConfig& c) { c.Dk = 0; }, "Dk"},
      {[](UltraMemConfig& c) { c.Dv = 0; }, "Dv"},
      {[](UltraMemConfig& c) { c.r = 0; }, "r"},
      {[](UltraMemConfig& c) { c.C = 0; }, "C"},
      {[](UltraMemConfig& c) { c.H = 0; }, "H"},
      {[](UltraMemConfig& c) { c.m = 0; }, "m"},
      // Retrieval filters.
      {[](UltraMemConfig& c) { c.m_neg = 2; }, "m_neg"},  // m_neg with the paper's filter
      {[](UltraMemConfig& c) { c.filter = RetrievalFilter::kTwoSign; c.m_neg = 6; }, "m_neg"},  // = m_first
      {[](UltraMemConfig& c) { c.filter = RetrievalFilter::kTwoSign; c.m_neg = -1; }, "m_neg"},
      {[](UltraMemConfig& c) { c.filter = RetrievalFilter::kTwoSign; c.m_first = 3; c.m = 6; }, "m_neg"},  // 2*2 + 1*1 < 6
      {[](UltraMemConfig& c) { c.filter = RetrievalFilter::kTwoSign; c.m_first = 1; c.m = 1; }, "m_first"},
      {[](UltraMemConfig& c) { c.filter_rank = 1; }, "filter_rank"},  // filter_rank with the paper's filter
      {[](UltraMemConfig& c) { c.filter = RetrievalFilter::kRankR; c.filter_rank = 3; }, "filter_rank"},  // > r
      {[](UltraMemConfig& c) { c.filter = RetrievalFilter::kRankR; c.filter_rank = -1; }, "filter_rank"},
      {[](UltraMemConfig& c) { c.filter = RetrievalFilter::kRankR; c.m_neg = 2; }, "m_neg"},
      {[](UltraMemConfig& c) { c.retrieval_sample = -1; }, "retrieval_sample"},
  };
  for (const auto& cs : cases) {
    auto c = small_config();
    cs.edit(c);
    try {
      UltraMem layer(c);
      ADD_FAILURE() << "no error for an invalid " << cs.field;
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find("UltraMemConfig." + cs.field + ":"), std::string::npos)
          << e.what();
    }
  }
}

TEST(UltraMemLayer, BadInputTensorGivesClearError) {
  UltraMem layer(small_config());
  try {
    layer->forward(torch::randn({3, 23}));
    ADD_FAILURE() << "no error for a wrong width";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("D=24"), std::string::npos) << e.what();
  }
  EXPECT_THROW(layer->forward(torch::randn({3, 24}, torch::kDouble)), c10::Error);
  EXPECT_THROW(layer->forward(torch::randint(0, 3, {3, 24})), c10::Error);
  // An empty batch is fine.
  EXPECT_EQ(layer->forward(torch::randn({0, 24})).size(0), 0);
}

TEST(PKMLayer, GradientsDoubleLayerNormQuery) {
  PKMConfig c;
  c.D = 16;
  c.n = 6;
  c.Dk = 8;
  c.Dv = 12;
  c.H = 2;
  c.m = 4;
  c.query_norm = PKMConfig::QueryNorm::Layer;
  c.seed = 2;
  PKM layer(c);
  check_all_gradients(layer, c.D, false);
}

TEST(PKMLayer, GradientsDoubleBatchNormQueryAndNoProjection) {
  PKMConfig c;
  c.D = 16;
  c.n = 6;
  c.Dk = 8;
  c.Dv = 16;
  c.H = 2;
  c.m = 3;
  c.query_norm = PKMConfig::QueryNorm::Batch;
  PKM layer(c);
  EXPECT_FALSE(layer->wo.defined());
  check_all_gradients(layer, c.D, false);
}

TEST(PKMLayer, MatchesDirectProductKeyFormula) {
  PKMConfig c;
  c.D = 16;
  c.n = 5;
  c.Dk = 8;
  c.Dv = 16;
  c.H = 2;
  c.m = 3;
  c.query_norm = PKMConfig::QueryNorm::None;
  PKM layer(c);
  torch::manual_seed(3);
  const auto x = torch::randn({4, c.D});
  const auto out = layer->forward(x);
  // Direct: full grid of s_row[i] + s_col[j], top-m per head, softmax, weighted value rows.
  const auto q = x.matmul(layer->wq).view({4, c.H, 2, c.Dk});
  const auto s = torch::einsum("thsd,hsid->thsi", {q, layer->keys});
  auto expect = torch::zeros({4, c.D});
  for (int64_t h = 0; h < c.H; ++h) {
    const auto grid = (s.select(1, h).select(1, 0).unsqueeze(2) + s.select(1, h).select(1, 1).unsqueeze(1))
                          .reshape({4, c.n * c.n});
    auto [top, idx] = grid.topk(c.m, 1);
    const auto w = torch::softmax(top, 1);
    expect += (layer->values.index_select(0, idx.reshape(-1)).view({4, c.m, c.Dv}) * w.unsqueeze(2)).sum(1);
  }
  EXPECT_TRUE(torch::allclose(out, expect, 1e-5, 1e-6));
}

TEST(PKMLayer, InvalidConfigNamesTheField) {
  PKMConfig c;
  c.m = 65;
  EXPECT_THROW(PKM{c}, std::invalid_argument);
  c = PKMConfig{};
  c.Dk = 0;
  try {
    PKM layer(c);
    ADD_FAILURE();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("PKMConfig.Dk"), std::string::npos);
  }
}

// ---------------------------------------------------------------------------------------------
// UltraMemV2 (spec section 11): each switch against the V1 layer it generalises, gradients, errors.

namespace {

UltraMemConfig v2_config() {
  auto c = small_config();
  c.query_per_rank = true;
  c.single_projection = true;
  c.Dp = 6;
  return c;
}

// The V1 layer's output for x, computed by a V1 layer holding `v2`'s shared weights (cores, keys, values, ...).
UltraMem v1_twin(const UltraMem& v2, UltraMemConfig c) {
  c.query_per_rank = false;
  c.single_projection = false;
  c.Dp = 0;
  c.value_init = ultramem::nn::ValueInit::Paper;
  UltraMem v1(c);
  torch::NoGradGuard ng;
  for (const char* name : {"q_scale", "keys", "k_scale", "cores", "values"})
    v1->named_parameters()[name].copy_(v2->named_parameters()[name]);
  v1->perm.copy_(v2->perm);
  v1->refresh_tucker_approx();
  return v1;
}

}  // namespace

TEST(UltraMemV2Layer, ShapesAndExactGradientsOfEveryParameter) {
  UltraMem layer(v2_config());
  const auto c = v2_config();
  EXPECT_EQ(layer->wq.sizes(), (std::vector<int64_t>{c.D, 2 * c.r * c.Dk}));
  EXPECT_EQ(layer->wo.sizes(), (std::vector<int64_t>{c.Dv, c.D}));
  EXPECT_EQ(layer->wp.sizes(), (std::vector<int64_t>{c.D, c.Dp}));
  EXPECT_EQ(layer->pre_values.sizes(), (std::vector<int64_t>{c.physical_rows(), c.Dp}));
  check_all_gradients(layer, c.D, /*with_aux=*/false);
}

TEST(UltraMemV2Layer, EachSwitchEqualsTheV1LayerItGeneralises) {
  torch::manual_seed(5);
  const auto x = torch::randn({7, 24});
  // Query per rank with every rank's half equal to V1's query: the same scores, the same output.
  {
    auto c = small_config();
    c.query_per_rank = true;
    UltraMem v2(c);
    UltraMem v1 = v1_twin(v2, c);
    torch::NoGradGuard ng;
    const auto q = v1->wq.view({c.D, 2, 1, c.Dk}).expand({c.D, 2, c.r, c.Dk}).reshape({c.D, 2 * c.r * c.Dk});
    v2->wq.copy_(q);
    v2->wo.copy_(v1->wo);
    EXPECT_TRUE(torch::allclose(v2->forward(x), v1->forward(x), 1e-5, 1e-6));
  }
  // One projection: V1 with the same [Dv, D] block for every IVE group.
  {
    auto c = small_config();
    c.single_projection = true;
    UltraMem v2(c);
    UltraMem v1 = v1_twin(v2, c);
    torch::NoGradGuard ng;
    v1->wq.copy_(v2->wq);
    v1->wo.copy_(v2->wo.repeat({c.E, 1}));
    EXPECT_TRUE(torch::allclose(v2->forward(x), v1->forward(x), 1e-5, 1e-6));
  }
  // Pre-values with one nonzero column: every kept slot's weight times <x, w>, so the output scales by it.
  {
    auto c = small_config();
    c.Dp = 3;
    UltraMem v2(c);
    UltraMem v1 = v1_twin(v2, c);
    torch::NoGradGuard ng;
    v1->wq.copy_(v2->wq);
    v1->wo.copy_(v2->wo);
    v2->pre_values.zero_();
    v2->pre_values.select(1, 1).fill_(1.0);
    const auto w = torch::randn({c.D});
    v2->wp.zero_();
    v2->wp.select(1, 1).copy_(w);
    const auto want = v1->forward(x) * x.matmul(w).unsqueeze(1);
    EXPECT_TRUE(torch::allclose(v2->forward(x), want, 1e-4, 1e-5));
  }
}

// The no-grad forward runs the fused op (ops::ultramem_decode with the V2 switches): for each switch alone,
// all three, and with the other filters and LayerNorm, it equals the autograd forward; its two phases
// equal it bit for bit; bf16 and int8 tables equal the autograd forward over the rounded table.
TEST(UltraMemV2Layer, FusedNoGradForwardEqualsTheAutogradOneForEverySwitchAndTableFormat) {
  using ultramem::nn::ValueFormat;
  std::vector<std::pair<std::string, UltraMemConfig>> cases;
  auto add = [&](const std::string& name, bool qpr, bool single, int64_t Dp) {
    auto c = small_config();
    c.query_per_rank = qpr;
    c.single_projection = single;
    c.Dp = Dp;
    cases.push_back({name, c});
  };
  add("query per rank", true, false, 0);
  add("one projection", false, true, 0);
  add("pre-values", false, false, 5);
  add("all three", true, true, 6);
  auto c = v2_config();
  c.filter = ultramem::nn::RetrievalFilter::kRankR;
  cases.push_back({"all three, rank-2 filter", c});
  c = v2_config();
  c.filter = ultramem::nn::RetrievalFilter::kTwoSign;
  c.qk_norm = ultramem::nn::NormKind::Layer;
  cases.push_back({"all three, two-sign filter, LayerNorm", c});
  torch::manual_seed(2);
  const auto x = torch::randn({2, 5, 24});
  for (const auto& [name, cfg] : cases) {
    SCOPED_TRACE(name);
    UltraMem layer(cfg);
    const auto want = layer->forward(x).detach();  // autograd ops
    torch::NoGradGuard ng;
    ASSERT_TRUE(layer->two_phase_applies());
    const auto got = layer->forward(x);
    EXPECT_TRUE(torch::allclose(got, want, 1e-5, 1e-6)) << (got - want).abs().max().item<double>();
    EXPECT_TRUE(torch::equal(layer->lookup(layer->retrieve(x, /*prefetch_bytes=*/1 << 20)), got));
    for (ValueFormat f : {ValueFormat::kBFloat16, ValueFormat::kInt8}) {
      UltraMem compact(cfg), rounded(cfg);  // same seed: the same weights
      compact->set_value_format(f);
      const auto table = f == ValueFormat::kInt8 ? compact->values.to(torch::kFloat) * compact->values_scale.unsqueeze(1)
                                                 : compact->values.to(torch::kFloat);
      rounded->values.copy_(table);
      const auto ref = [&] {
        torch::AutoGradMode on(true);
        return rounded->forward(x).detach();
      }();
      const auto out = compact->forward(x);
      EXPECT_TRUE(torch::allclose(out, ref, 1e-5, 1e-6))
          << ultramem::nn::to_string(f) << ": " << (out - ref).abs().max().item<double>();
      EXPECT_FALSE(torch::allclose(out, want, 1e-7, 1e-9)) << "the table was not rounded";
    }
  }
}

TEST(UltraMemV2Layer, InitFollowsTheSpecAndInvalidSettingsNameTheField) {
  auto c = UltraMemConfig::v2_defaults();
  c.D = 64;
  c.n = 16;
  c.Dv = 48;
  c.Dp = 16;
  c.num_layers = 4;
  c.inner_ratio = 2.5;
  c.m = c.m_first = 8;
  UltraMem layer(c);
  // sigma_V = (0.2 k_inner D / (m H (1 + sigma_s^2) Dp Dv L))^(1/4); linear std sqrt(2 / (5 D)).
  const double sigma = std::pow(0.2 * 2.5 * 64 / (8.0 * 1 * 1.1 * 16 * 48 * 4), 0.25);
  EXPECT_NEAR(layer->values.std().item<double>(), sigma, 0.05 * sigma);
  EXPECT_NEAR(layer->pre_values.std().item<double>(), sigma, 0.05 * sigma);
  EXPECT_NEAR(layer->wq.std().item<double>(), std::sqrt(2.0 / (5 * 64)), 0.05 * std::sqrt(2.0 / (5 * 64)));
  EXPECT_NEAR(layer->q_scale[0][0].item<double>(), std::pow(128.0, -0.4), 1e-6);
  EXPECT_FALSE(c.aux_loss);
  auto bad = c;
  bad.Dp = 0;
  try {
    UltraMem l(bad);
    FAIL() << "value_init v2 without pre-values should be refused";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("UltraMemConfig.value_init"), std::string::npos) << e.what();
  }
  bad = c;
  bad.Dp = -1;
  EXPECT_THROW(bad.validate(), std::invalid_argument);
}

// ---------------------------------------------------------------------------------------------
// Engram (spec section 12): the layer on its own (not yet a memory kind of the model).

namespace {

ultramem::nn::EngramConfig engram_config() {
  ultramem::nn::EngramConfig c;
  c.D = 12;
  c.heads = 2;
  c.d_e = 8;
  c.rows = 50;
  c.kernel = 3;
  c.seed = 4;
  return c;
}

}  // namespace

TEST(EngramLayer, ExactGradientsOfEveryParameterDouble) {
  ultramem::nn::Engram layer(engram_config());
  torch::manual_seed(3);
  const auto tokens = torch::randint(0, 20, {3, 4}, torch::kLong);
  const auto g = torch::randn({3, 4, 12}, torch::kDouble);
  check_gradients_of(layer, 12, [&](const torch::Tensor& u) { return (layer->forward(u, tokens) * g).sum(); });
}

TEST(EngramLayer, CompactTablesServeNoGradForwardsWithinRounding) {
  using ultramem::nn::ValueFormat;
  torch::manual_seed(6);
  const auto tokens = torch::randint(0, 30, {2, 5}, torch::kLong);
  const auto u = torch::randn({2, 5, 12});
  for (const ValueFormat f : {ValueFormat::kBFloat16, ValueFormat::kInt8}) {
    ultramem::nn::Engram layer(engram_config());
    torch::NoGradGuard ng;
    const auto want = layer->forward(u, tokens);
    const int64_t fp32_bytes = layer->value_bytes();
    layer->set_value_format(f);
    EXPECT_EQ(layer->value_format(), f);
    const int64_t rows = layer->values.size(0), cells = layer->values.numel();
    EXPECT_EQ(fp32_bytes, 4 * cells);
    EXPECT_EQ(layer->value_bytes(), f == ValueFormat::kInt8 ? cells + 4 * rows : 2 * cells);  // + int8's row scales
    EXPECT_FALSE(layer->values.requires_grad());
    const auto got = layer->forward(u, tokens);
    EXPECT_TRUE(torch::allclose(got, want, 2e-2, 2e-3)) << ultramem::nn::to_string(f) << ": "
                                                         << (got - want).abs().max().item<float>();
    EXPECT_FALSE(torch::equal(got, want));  // the rows were rounded
    if (f == ValueFormat::kInt8) {
      EXPECT_TRUE(layer->values_scale.defined());
      EXPECT_THROW(layer->set_value_format(ValueFormat::kBFloat16), std::logic_error);  // needs the fp32 weights
    }
  }
  ultramem::nn::Engram layer(engram_config());
  layer->set_value_format(ValueFormat::kBFloat16);
  expect_throw_with<c10::Error>([&] { layer->forward(u, tokens); }, "serves inference only");
  expect_throw_with<std::invalid_argument>([&] { layer->set_value_table(torch::zeros({3, 4}), {}, false); },
                                           "Engram::set_value_table: values must be a contiguous CPU tensor");
}

TEST(EngramLayer, DecodingStepByStepEqualsTheWholeSequence) {
  ultramem::nn::Engram layer(engram_config());
  torch::manual_seed(4);
  const auto tokens = torch::randint(0, 30, {3, 7}, torch::kLong);
  const auto u = torch::randn({3, 7, 12});
  torch::NoGradGuard ng;
  const auto whole = layer->forward(u, tokens);
  auto state = layer->make_state(3);
  std::vector<torch::Tensor> parts;
  parts.push_back(layer->forward(u.narrow(1, 0, 3), tokens.narrow(1, 0, 3), &state));  // a prompt, then steps
  for (int64_t t = 3; t < 7; ++t) parts.push_back(layer->forward(u.narrow(1, t, 1), tokens.narrow(1, t, 1), &state));
  EXPECT_TRUE(torch::allclose(torch::cat(parts, 1), whole, 1e-5, 1e-6));
}

// The no-grad forward is the fused op (ops/engram_decode.h): it equals the autograd forward for whole
// sequences and for one token at a time through the state (fewer tokens than the kernel's history), in
// float32 and float64; the autograd path's state steps agree with it.
TEST(EngramLayer, FusedNoGradForwardEqualsTheAutogradOne) {
  auto cfg = engram_config();
  cfg.kernel = 4;
  cfg.conv_std = 0.3;  // taps that matter
  for (auto dt : {torch::kFloat, torch::kDouble}) {
    SCOPED_TRACE(c10::toString(dt));
    ultramem::nn::Engram layer(cfg);
    layer->to(dt);
    torch::manual_seed(6);
    const auto tokens = torch::randint(0, 30, {3, 7}, torch::kLong);
    const auto u = torch::randn({3, 7, 12}, dt);
    const auto want = layer->forward(u, tokens).detach();  // autograd ops
    auto steps = [&](bool grad) {
      torch::AutoGradMode mode(grad);
      auto state = layer->make_state(3);
      std::vector<torch::Tensor> parts{layer->forward(u.narrow(1, 0, 1), tokens.narrow(1, 0, 1), &state)};
      for (int64_t t = 1; t < 7; ++t) parts.push_back(layer->forward(u.narrow(1, t, 1), tokens.narrow(1, t, 1), &state));
      return torch::cat(parts, 1).detach();
    };
    const double tol = dt == torch::kFloat ? 1e-5 : 1e-12;
    torch::Tensor whole;
    {
      torch::NoGradGuard ng;
      whole = layer->forward(u, tokens);
    }
    EXPECT_TRUE(torch::allclose(whole, want, tol, tol)) << (whole - want).abs().max().item<double>();
    EXPECT_TRUE(torch::allclose(steps(false), want, tol, tol));
    EXPECT_TRUE(torch::allclose(steps(true), want, tol, tol));
    EXPECT_GT((want - layer->forward(u, torch::zeros_like(tokens)).detach()).abs().max().item<double>(), 1e-3)
        << "the rows matter";
  }
  // The op's own checks name the argument.
  ultramem::nn::Engram layer(cfg);
  ultramem::ops::EngramDecodeWeights w{layer->values.detach(), {}, layer->wk.detach(), layer->wv.detach(),
                                       layer->gate_u.detach(), layer->gate_k.detach(), layer->conv_norm.detach(),
                                       layer->conv.detach()};
  auto state = torch::zeros({1, cfg.kernel - 1, cfg.D});
  auto rows = layer->rows(torch::zeros({1, 2}, torch::kLong));
  EXPECT_EQ(ultramem::ops::engram_decode(torch::randn({1, 2, cfg.D}), rows, w, state).sizes(),
            (std::vector<int64_t>{1, 2, cfg.D}));
  rows[0][1][0] = layer->values.size(0);
  expect_throw_with<c10::Error>([&] { ultramem::ops::engram_decode(torch::randn({1, 2, cfg.D}), rows, w, state); },
                                "outside the table");
  auto bad_state = torch::zeros({1, cfg.kernel, cfg.D});
  expect_throw_with<c10::Error>(
      [&] { ultramem::ops::engram_decode(torch::randn({1, 2, cfg.D}), layer->rows(torch::zeros({1, 2}, torch::kLong)), w, bad_state); },
      "engram_decode: conv_state must have shape");
}

TEST(EngramLayer, RowsDependOnTheLastThreeTokensAndStayInTheirTables) {
  ultramem::nn::Engram layer(engram_config());
  const auto& sizes = layer->table_sizes();
  ASSERT_EQ(sizes.size(), 4u);
  for (size_t j = 0; j < sizes.size(); ++j) {
    EXPECT_EQ(ultramem::ops::next_prime(sizes[j]), sizes[j]);
    if (j) EXPECT_GT(sizes[j], sizes[j - 1]);  // distinct primes
  }
  EXPECT_EQ(layer->values.size(0), layer->table_offsets().back() + sizes.back());
  torch::manual_seed(5);
  auto tokens = torch::randint(0, 1000, {1, 12}, torch::kLong);
  const auto a = layer->rows(tokens);
  for (int64_t j = 0; j < 4; ++j) {
    const auto col = a.select(2, j);
    EXPECT_TRUE((col >= layer->table_offsets()[j]).all().item<bool>());
    EXPECT_TRUE((col < layer->table_offsets()[j] + sizes[j]).all().item<bool>());
  }
  tokens[0][5] = 1001;
  const auto b = layer->rows(tokens);
  const auto changed = (a != b).any(2)[0];  // [T]
  for (int64_t t = 0; t < 12; ++t) EXPECT_EQ(changed[t].item<bool>(), t >= 5 && t <= 7) << "position " << t;
  // 2-gram tables see positions 5 and 6 changed, 3-gram tables 5, 6 and 7.
  EXPECT_FALSE((a.select(2, 0)[0][7] != b.select(2, 0)[0][7]).item<bool>());
  EXPECT_TRUE((a.select(2, 2)[0][7] != b.select(2, 2)[0][7]).item<bool>() ||
              (a.select(2, 3)[0][7] != b.select(2, 3)[0][7]).item<bool>());
  // The output is causal: earlier positions do not see the change.
  torch::NoGradGuard ng;
  const auto u = torch::randn({1, 12, 12});
  auto t2 = tokens.clone();
  t2[0][5] = 7;
  const auto o1 = layer->forward(u, tokens), o2 = layer->forward(u, t2);
  EXPECT_TRUE(torch::equal(o1.narrow(1, 0, 5), o2.narrow(1, 0, 5)));
  EXPECT_FALSE(torch::equal(o1.narrow(1, 5, 1), o2.narrow(1, 5, 1)));
}

TEST(EngramLayer, InvalidConfigNamesTheField) {
  auto c = engram_config();
  c.d_e = 10;  // not a multiple of 2 * heads = 4
  expect_throw_with<std::invalid_argument>([&] { c.validate(); }, "EngramConfig.d_e");
  c = engram_config();
  c.kernel = 0;
  expect_throw_with<std::invalid_argument>([&] { c.validate(); }, "EngramConfig.kernel");
  ultramem::nn::Engram layer(engram_config());
  EXPECT_THROW(layer->forward(torch::randn({1, 3, 11}), torch::zeros({1, 3}, torch::kLong)), c10::Error);
}
