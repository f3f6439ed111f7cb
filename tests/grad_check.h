// Test helper: central-difference gradient checks in double precision, with per-entry assertions.
#pragma once
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <random>
#include <string>

namespace ultramem::testing {

// Compares analytic[i] with (loss(p + eps e_i) - loss(p - eps e_i)) / (2 eps) on up to `samples`
// entries of `param` (all when it is small). `param` is perturbed in place and restored.
inline void expect_grad_matches(const std::function<torch::Tensor()>& loss_fn, torch::Tensor param,
                                const torch::Tensor& analytic, const std::string& name,
                                int64_t samples = 24, double eps = 1e-6, double rtol = 1e-5,
                                double atol = 1e-8, uint64_t seed = 7) {
  ASSERT_TRUE(analytic.defined()) << name << ": no analytic gradient";
  ASSERT_EQ(param.scalar_type(), torch::kDouble) << name;
  const auto ana = (analytic.is_sparse() ? analytic.to_dense() : analytic).contiguous().view(-1);
  ASSERT_EQ(ana.numel(), param.numel()) << name;
  const int64_t numel = param.numel();
  std::vector<int64_t> picks(numel);
  for (int64_t i = 0; i < numel; ++i) picks[i] = i;
  if (numel > samples) {
    std::mt19937_64 rng(seed);
    std::shuffle(picks.begin(), picks.end(), rng);
    picks.resize(samples);
  }
  torch::NoGradGuard no_grad;
  auto flat = param.view(-1);
  for (int64_t i : picks) {
    const double orig = flat[i].item<double>();
    flat[i].fill_(orig + eps);
    const double lp = loss_fn().item<double>();
    flat[i].fill_(orig - eps);
    const double lm = loss_fn().item<double>();
    flat[i].fill_(orig);
    const double num = (lp - lm) / (2 * eps);
    const double a = ana[i].item<double>();
    EXPECT_LE(std::abs(num - a), atol + rtol * std::max(std::abs(num), std::abs(a)))
        << name << "[" << i << "]: numerical " << num << " vs analytic " << a;
  }
}

}  // namespace ultramem::testing
