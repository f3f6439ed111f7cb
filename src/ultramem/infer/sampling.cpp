#include "ultramem/infer/sampling.h"

#include <torch/torch.h>

#include <chrono>
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
  auto l = logits.detach().to(torch::kFloat).reshape({-1});  // [V]
  if (o.temperature == 0) return l.argmax().item<int64_t>();
  l = l / o.temperature;
  if (o.top_k > 0 && o.top_k < l.size(0)) {
    const auto kth = std::get<0>(l.topk(o.top_k)).min();
    l = l.masked_fill(l < kth, -std::numeric_limits<float>::infinity());
  }
  auto probs = torch::softmax(l, 0);
  if (o.top_p < 1.0) {
    auto [sorted, order] = probs.sort(0, /*descending=*/true);
    const auto cum = sorted.cumsum(0);
    // drop a token when the mass before it already reaches top_p (the first token always stays)
    const auto drop_sorted = (cum - sorted) >= o.top_p;
    const auto drop = torch::zeros_like(drop_sorted).scatter(0, order, drop_sorted);
    probs = probs.masked_fill(drop, 0);
    probs = probs / probs.sum();
  }
  return torch::multinomial(probs, 1, /*replacement=*/false, gen).item<int64_t>();
}

std::vector<int64_t> generate(nn::Transformer& model, std::vector<int64_t> prompt, const SamplingOptions& o,
                              int64_t eos_id, const std::function<void(int64_t)>& on_token, GenerateTiming* timing) {
  o.validate();
  if (prompt.empty()) throw std::invalid_argument("generate: the prompt must hold at least one token");
  torch::InferenceMode guard;
  model->eval();
  const int64_t ctx = model->config().max_seq_len;
  if (static_cast<int64_t>(prompt.size()) > ctx) prompt.erase(prompt.begin(), prompt.end() - ctx);
  torch::Generator gen = at::detail::createCPUGenerator(o.seed);
  auto cache = model->make_cache(1, ctx);
  using Clock = std::chrono::steady_clock;
  auto since = [](Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); };
  auto t0 = Clock::now();
  auto logits = model->forward_cached(torch::tensor(prompt, torch::kLong).view({1, -1}), cache);
  int64_t id = sample_token(logits[0][logits.size(1) - 1], o, gen);
  if (timing) {
    timing->prompt_tokens = static_cast<int64_t>(prompt.size());
    timing->prompt_seconds = since(t0);
    timing->step_seconds.clear();
  }
  std::vector<int64_t> out;
  std::string stop = "max_tokens";
  while (static_cast<int64_t>(out.size()) < o.max_tokens) {
    if (id == eos_id) {
      stop = "eos";
      break;
    }
    out.push_back(id);
    if (on_token) on_token(id);
    if (static_cast<int64_t>(out.size()) >= o.max_tokens) break;
    if (cache.length >= ctx) {
      stop = "context_full";
      break;
    }
    t0 = Clock::now();
    logits = model->forward_cached(torch::tensor({id}, torch::kLong).view({1, 1}), cache);
    id = sample_token(logits[0][logits.size(1) - 1], o, gen);
    if (timing) timing->step_seconds.push_back(since(t0));
  }
  if (timing) timing->stop_reason = stop;
  return out;
}

}  // namespace ultramem::infer
