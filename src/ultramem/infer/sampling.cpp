#include "ultramem/infer/sampling.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>

namespace ultramem::infer {

void SamplingOptions::validate() const {
  if (!(temperature >= 0)) throw std::invalid_argument("temperature: must be >= 0 (0 = greedy)");
  if (top_k < 0) throw std::invalid_argument("top_k: must be >= 0 (0 = all tokens)");
  if (!(top_p > 0 && top_p <= 1)) throw std::invalid_argument("top_p: must be in (0, 1]");
  if (max_tokens < 0) throw std::invalid_argument("max_tokens: must be >= 0");
}

int64_t sample_token(const torch::Tensor& logits, const SamplingOptions& o, torch::Generator& gen) {
  const auto l = logits.detach().to(torch::kFloat).contiguous().reshape({-1});  // [V]
  return sample_token(l.data_ptr<float>(), l.size(0), o, gen);
}

int64_t sample_token(const float* logits, int64_t V, const SamplingOptions& o, torch::Generator& gen) {
  if (V < 1) throw std::invalid_argument("sample_token: no logits");
  if (o.temperature == 0) return std::max_element(logits, logits + V) - logits;
  thread_local std::vector<float> z, kth_scratch;
  thread_local std::vector<double> p;
  thread_local std::vector<int64_t> order;
  z.resize(V);
  const float inv_t = static_cast<float>(o.temperature);
  for (int64_t i = 0; i < V; ++i) z[i] = logits[i] / inv_t;
  float kth = -std::numeric_limits<float>::infinity();  // keep z >= kth
  if (o.top_k > 0 && o.top_k < V) {
    kth_scratch.assign(z.begin(), z.end());
    std::nth_element(kth_scratch.begin(), kth_scratch.begin() + (o.top_k - 1), kth_scratch.end(), std::greater<float>());
    kth = kth_scratch[o.top_k - 1];
  }
  const float zmax = *std::max_element(z.begin(), z.end());
  p.resize(V);
  double total = 0;
  for (int64_t i = 0; i < V; ++i) {  // float exp (about 4x cheaper than double), summed in double
    p[i] = z[i] >= kth ? double(std::exp(z[i] - zmax)) : 0.0;
    total += p[i];
  }
  if (o.top_p < 1.0) {
    // Drop a token when the mass of the more likely ones already reaches top_p (the first always stays).
    order.resize(V);
    for (int64_t i = 0; i < V; ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return p[a] > p[b]; });
    double before = 0;
    const double cut = o.top_p * total;
    for (int64_t r = 0; r < V; ++r) {
      const int64_t i = order[r];
      const double pi = p[i];
      if (r > 0 && before >= cut) p[i] = 0;
      before += pi;
    }
    total = 0;
    for (int64_t i = 0; i < V; ++i) total += p[i];
  }
  uint64_t bits;
  {
    auto* g = gen.get<at::CPUGeneratorImpl>();
    std::lock_guard<std::mutex> lock(gen.mutex());
    bits = g->random64();
  }
  const double u = double(bits >> 11) * (1.0 / 9007199254740992.0) * total;  // [0, total)
  double cum = 0;
  int64_t last = -1;
  for (int64_t i = 0; i < V; ++i) {
    if (p[i] <= 0) continue;
    cum += p[i];
    last = i;
    if (u < cum) return i;
  }
  return last >= 0 ? last : std::max_element(logits, logits + V) - logits;  // rounding at the very end
}

BatchResult generate_batch(nn::Transformer& model, std::vector<std::vector<int64_t>> prompts, const SamplingOptions& o,
                           int64_t eos_id, const std::function<void(int64_t, int64_t)>& on_token) {
  o.validate();
  const int64_t B = static_cast<int64_t>(prompts.size());
  if (B == 0) throw std::invalid_argument("generate_batch: no prompts");
  torch::InferenceMode guard;
  model->eval();
  const int64_t ctx = model->config().max_seq_len;
  int64_t common = ctx;
  for (int64_t b = 0; b < B; ++b) {
    auto& p = prompts[b];
    if (p.empty()) throw std::invalid_argument("generate_batch: prompt " + std::to_string(b) + " holds no token");
    if (static_cast<int64_t>(p.size()) > ctx) p.erase(p.begin(), p.end() - ctx);
    common = std::min<int64_t>(common, static_cast<int64_t>(p.size()));
  }
  BatchResult r;
  r.tokens.resize(B);
  r.stop_reasons.assign(B, "");
  std::vector<torch::Generator> gens;
  for (int64_t b = 0; b < B; ++b) gens.push_back(at::detail::createCPUGenerator(o.seed));
  std::vector<int64_t> next(B);  // the token each sequence is fed next (a stopped one: its last, ignored)
  for (int64_t b = 0; b < B; ++b) next[b] = prompts[b].back();
  int64_t active = B;
  // After n tokens of every sequence are in the cache, sequence b's logits at n - 1 predict its token
  // n: a prompt token (forced) or a sampled one (emitted, or the end of the sequence).
  auto advance = [&](const torch::Tensor& logits, int64_t n) {  // logits [B, V] at position n - 1
    for (int64_t b = 0; b < B; ++b) {
      if (!r.stop_reasons[b].empty()) continue;
      const auto& p = prompts[b];
      if (n < static_cast<int64_t>(p.size())) {
        next[b] = p[n];
        continue;
      }
      auto& out = r.tokens[b];
      if (static_cast<int64_t>(out.size()) >= o.max_tokens) {
        r.stop_reasons[b] = "max_tokens";
      } else {
        const int64_t id = sample_token(logits[b], o, gens[b]);
        if (id == eos_id) {
          r.stop_reasons[b] = "eos";
        } else {
          out.push_back(id);
          if (on_token) on_token(b, id);
          next[b] = id;
          if (static_cast<int64_t>(out.size()) >= o.max_tokens) r.stop_reasons[b] = "max_tokens";
        }
      }
      if (!r.stop_reasons[b].empty()) --active;
    }
  };
  using Clock = std::chrono::steady_clock;
  auto t0 = Clock::now();
  auto cache = model->make_cache(B, ctx);
  std::vector<int64_t> first(B * common);
  for (int64_t b = 0; b < B; ++b) std::copy(prompts[b].begin(), prompts[b].begin() + common, first.begin() + b * common);
  auto logits = model->forward_cached(torch::tensor(first, torch::kLong).view({B, common}), cache, /*last_only=*/true);
  advance(logits.select(1, 0), common);
  r.prefill_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  while (active > 0) {
    if (cache.length >= ctx) {
      for (auto& s : r.stop_reasons)
        if (s.empty()) s = "context_full";
      break;
    }
    t0 = Clock::now();
    logits = model->forward_cached(torch::tensor(next, torch::kLong).view({B, 1}), cache);
    ++r.steps;
    advance(logits.select(1, 0), cache.length);
    r.step_seconds.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
    r.decode_seconds += r.step_seconds.back();
  }
  return r;
}

std::vector<int64_t> generate(nn::Transformer& model, std::vector<int64_t> prompt, const SamplingOptions& o,
                              int64_t eos_id, const std::function<void(int64_t)>& on_token, GenerateTiming* timing) {
  if (prompt.empty()) throw std::invalid_argument("generate: the prompt must hold at least one token");
  const int64_t used = std::min<int64_t>(static_cast<int64_t>(prompt.size()), model->config().max_seq_len);
  std::function<void(int64_t, int64_t)> each;
  if (on_token) each = [&on_token](int64_t, int64_t id) { on_token(id); };
  BatchResult r = generate_batch(model, {std::move(prompt)}, o, eos_id, each);
  if (timing) {
    timing->prompt_tokens = used;
    timing->prompt_seconds = r.prefill_seconds;
    timing->step_seconds = std::move(r.step_seconds);
    timing->stop_reason = r.stop_reasons[0];
  }
  return std::move(r.tokens[0]);
}

}  // namespace ultramem::infer
