// Tests of the autograd ops: numerical gradients in double precision, sparse/dense value gradients,
// thread-count determinism, and a clear error for every malformed argument.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>

#include "grad_check.h"
#include "ultramem/ops/ops.h"
#include "ultramem/ops/runtime.h"

using ultramem::testing::expect_grad_matches;

namespace {

struct TdqkrInputs {
  torch::Tensor s_row, s_col, cores, u, v;  // [T,H,r,n] x2, [C,H,r,r], [H,r] x2
};

TdqkrInputs make_tdqkr(int64_t T, int64_t H, int64_t r, int64_t n, int64_t C, torch::Dtype dt) {
  torch::manual_seed(17);
  auto o = torch::TensorOptions().dtype(dt);
  return {torch::randn({T, H, r, n}, o), torch::randn({T, H, r, n}, o), torch::rand({C, H, r, r}, o),
          torch::rand({H, r}, o), torch::rand({H, r}, o)};
}

struct PoolInputs {
  torch::Tensor values, index, scores, perm;  // [N,Dv], [T,K], [T,K,C], [E*N]
};

PoolInputs make_pool(int64_t T, int64_t K, int64_t N, int64_t Dv, int64_t E, int64_t C, torch::Dtype dt) {
  torch::manual_seed(23);
  auto o = torch::TensorOptions().dtype(dt);
  return {torch::randn({N, Dv}, o), torch::randint(0, E * N, {T, K}, torch::kLong),
          torch::randn({T, K, C}, o), torch::randperm(E * N, torch::kLong)};
}

template <typename Fn>
void expect_error_mentions(Fn&& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "no error; expected one mentioning \"" << needle << "\"";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

}  // namespace

TEST(TdqkrOp, NumericalGradientsDouble) {
  auto in = make_tdqkr(4, 2, 2, 7, 3, torch::kDouble);
  for (auto* t : {&in.s_row, &in.s_col, &in.cores}) t->requires_grad_(true);
  const auto w = torch::randn({4, 2 * 5, 3}, torch::kDouble);
  auto loss = [&] {
    auto [scores, index] = ultramem::ops::tdqkr(in.s_row, in.s_col, in.cores, in.u, in.v, 4, 5);
    return (scores * w).sum();
  };
  loss().backward();
  expect_grad_matches(loss, in.s_row.detach(), in.s_row.grad(), "s_row", 40);
  expect_grad_matches(loss, in.s_col.detach(), in.s_col.grad(), "s_col", 40);
  expect_grad_matches(loss, in.cores.detach(), in.cores.grad(), "cores", 40);
}

TEST(TdqkrOp, OutputLayoutAndOrdering) {
  auto in = make_tdqkr(3, 2, 2, 9, 2, torch::kFloat);
  auto [scores, index] = ultramem::ops::tdqkr(in.s_row, in.s_col, in.cores, in.u, in.v, 9, 6);
  ASSERT_EQ(scores.sizes(), (std::vector<int64_t>{3, 12, 2}));
  ASSERT_EQ(index.sizes(), (std::vector<int64_t>{3, 12}));
  EXPECT_EQ(index.scalar_type(), torch::kLong);
  const auto total = scores.sum(-1).view({3, 2, 6});
  // each head's m sorted by the core sum, descending
  EXPECT_TRUE((total.narrow(2, 0, 5) >= total.narrow(2, 1, 5)).all().item<bool>());
  EXPECT_TRUE((index >= 0).all().item<bool>());
  EXPECT_TRUE((index < 81).all().item<bool>());
  // With m_first = n the kept set is the exact top-m of the grid (head 0 of token 0 checked here).
  const auto grid = torch::einsum("ai,cab,bj->cij", {in.s_row[0][0], in.cores.select(1, 0), in.s_col[0][0]});
  auto [top, idx] = grid.sum(0).reshape(-1).topk(6);
  EXPECT_TRUE(torch::equal(std::get<0>(idx.sort()), std::get<0>(index[0].narrow(0, 0, 6).sort())));
}

TEST(PooledLookupOp, NumericalGradientsDouble) {
  auto in = make_pool(5, 6, 7, 8, 4, 2, torch::kDouble);
  in.values.requires_grad_(true);
  in.scores.requires_grad_(true);
  const auto w = torch::randn({5, 4 * 8}, torch::kDouble);
  auto loss = [&] { return (ultramem::ops::pooled_lookup(in.values, in.index, in.scores, in.perm, 4) * w).sum(); };
  loss().backward();
  expect_grad_matches(loss, in.values.detach(), in.values.grad(), "values", 56);
  expect_grad_matches(loss, in.scores.detach(), in.scores.grad(), "scores", 60);
}

TEST(PooledLookupOp, SparseGradientEqualsDenseAndStoresOnlyHitRows) {
  auto in = make_pool(4, 3, 50, 8, 1, 1, torch::kFloat);
  auto dense_v = in.values.clone().requires_grad_(true);
  auto sparse_v = in.values.clone().requires_grad_(true);
  ultramem::ops::pooled_lookup(dense_v, in.index, in.scores, in.perm, 1, false).sum().backward();
  ultramem::ops::pooled_lookup(sparse_v, in.index, in.scores, in.perm, 1, true).sum().backward();
  const auto sg = sparse_v.grad();
  ASSERT_TRUE(sg.is_sparse());
  EXPECT_EQ(sg.coalesce()._nnz(), sg._nnz());  // one entry per row hit
  const auto rows = std::get<0>(at::_unique(in.perm.index_select(0, in.index.view(-1)) % 50));
  EXPECT_EQ(sg._nnz(), rows.numel());
  EXPECT_TRUE(torch::allclose(sg.to_dense(), dense_v.grad()));
}

TEST(PooledLookupOp, ValueGradientIdenticalForOneAndTwoThreads) {
  auto in = make_pool(257, 16, 40, 32, 4, 2, torch::kFloat);  // many tokens hit the same rows
  auto grad_with = [&](int threads) {
    ultramem::set_threads(threads);
    auto v = in.values.clone().requires_grad_(true);
    auto s = in.scores.clone().requires_grad_(true);
    (ultramem::ops::pooled_lookup(v, in.index, s, in.perm, 4).pow(2)).sum().backward();
    ultramem::set_threads(0);
    return std::make_pair(v.grad(), s.grad());
  };
  const auto a = grad_with(1), b = grad_with(2);
  EXPECT_TRUE(torch::equal(a.first, b.first));
  EXPECT_TRUE(torch::equal(a.second, b.second));
}

TEST(TdqkrOp, BadArgumentsNameTheArgument) {
  using ultramem::ops::tdqkr;
  const auto in = make_tdqkr(2, 2, 2, 5, 2, torch::kFloat);
  expect_error_mentions([&] { tdqkr(in.s_row.to(torch::kInt), in.s_col, in.cores, in.u, in.v, 3, 4); }, "s_row must have dtype");
  expect_error_mentions([&] { tdqkr(in.s_row.to(torch::kHalf), in.s_col, in.cores, in.u, in.v, 3, 4); }, "s_row must have dtype");
  expect_error_mentions([&] { tdqkr(in.s_row, in.s_col.to(torch::kDouble), in.cores, in.u, in.v, 3, 4); }, "share one dtype");
  expect_error_mentions([&] { tdqkr(in.s_row[0], in.s_col, in.cores, in.u, in.v, 3, 4); }, "s_row must have 4 dimensions");
  expect_error_mentions([&] { tdqkr(in.s_row, in.s_col.narrow(3, 0, 4), in.cores, in.u, in.v, 3, 4); }, "s_col must have shape");
  expect_error_mentions([&] { tdqkr(in.s_row, in.s_col, in.cores.narrow(2, 0, 1), in.u, in.v, 3, 4); }, "cores must have shape");
  expect_error_mentions([&] { tdqkr(in.s_row, in.s_col, in.cores, in.u.narrow(0, 0, 1), in.v, 3, 4); }, "u must have shape");
  expect_error_mentions([&] { tdqkr(in.s_row, in.s_col, in.cores, in.u, in.v.narrow(1, 0, 1), 3, 4); }, "v must have shape");
  expect_error_mentions([&] { tdqkr(in.s_row, in.s_col, in.cores, in.u, in.v, 6, 4); }, "m_first");
  expect_error_mentions([&] { tdqkr(in.s_row, in.s_col, in.cores, in.u, in.v, 0, 1); }, "m_first");
  expect_error_mentions([&] { tdqkr(in.s_row, in.s_col, in.cores, in.u, in.v, 2, 5); }, "m must be");
  expect_error_mentions([&] { tdqkr(in.s_row, in.s_col, in.cores, in.u, in.v, 2, 0); }, "m must be");
  expect_error_mentions([&] { tdqkr(in.s_row.to(torch::kMeta), in.s_col, in.cores, in.u, in.v, 3, 4); }, "s_row must be a CPU tensor");
  expect_error_mentions([&] { tdqkr(torch::Tensor(), in.s_col, in.cores, in.u, in.v, 3, 4); }, "s_row is undefined");
  expect_error_mentions([&] { tdqkr(in.s_row.to_sparse(), in.s_col, in.cores, in.u, in.v, 3, 4); }, "dense");
}

TEST(PooledLookupOp, BadArgumentsNameTheArgument) {
  using ultramem::ops::pooled_lookup;
  const auto in = make_pool(2, 3, 6, 8, 4, 2, torch::kFloat);
  expect_error_mentions([&] { pooled_lookup(in.values.to(torch::kInt), in.index, in.scores, in.perm, 4); }, "values must have dtype");
  expect_error_mentions([&] { pooled_lookup(in.values, in.index.to(torch::kInt), in.scores, in.perm, 4); }, "index must have dtype");
  expect_error_mentions([&] { pooled_lookup(in.values, in.index, in.scores.to(torch::kDouble), in.perm, 4); }, "share one dtype");
  expect_error_mentions([&] { pooled_lookup(in.values, in.index.narrow(1, 0, 2), in.scores, in.perm, 4); }, "index must have shape");
  expect_error_mentions([&] { pooled_lookup(in.values, in.index, in.scores, in.perm.narrow(0, 0, 23), 4); }, "perm must have shape");
  expect_error_mentions([&] { pooled_lookup(in.values, in.index, in.scores, in.perm, 0); }, "E must be");
  expect_error_mentions([&] { pooled_lookup(in.values.narrow(1, 0, 7), in.index, in.scores, in.perm, 4); }, "divisible by C");
  expect_error_mentions([&] { pooled_lookup(in.values, in.index + 24, in.scores, in.perm, 4); }, "outside [0, E*N)");
  expect_error_mentions([&] { pooled_lookup(in.values, in.index, in.scores, in.perm * 2, 4); }, "perm[");
  expect_error_mentions([&] { pooled_lookup(in.values.to(torch::kMeta), in.index, in.scores, in.perm, 4); }, "CPU tensor");
  expect_error_mentions([&] { pooled_lookup(in.values, in.index, in.scores[0], in.perm, 4); }, "scores must have 3 dimensions");
}
