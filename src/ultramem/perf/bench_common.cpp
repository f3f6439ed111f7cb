#include "ultramem/perf/bench_common.h"

#include <torch/torch.h>

#include <algorithm>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <stdexcept>

namespace ultramem::perf {

JsonLines::JsonLines(const std::string& who, const std::string& path) {
  if (path.empty()) return;
  file_.open(path);
  if (!file_) throw std::runtime_error(who + ": cannot write --out file " + path);
}

void JsonLines::operator()(const nlohmann::ordered_json& line) {
  const std::string s = line.dump();
  std::cout << s << std::endl;
  if (file_.is_open()) file_ << s << std::endl;
}

nn::UltraMemConfig bench_layer_config(int64_t D, int64_t n, int64_t E, int64_t Dk, int64_t Dv, int64_t H, int64_t m) {
  nn::UltraMemConfig c;
  c.D = D;
  c.n = n;
  c.E = E;
  c.Dk = Dk;
  c.Dv = Dv;
  c.r = 2;
  c.C = 2;
  c.H = H;
  c.m = std::min(m, n);
  c.m_first = c.m;
  c.value_init = nn::ValueInit::Fixed;
  c.track_stats = false;
  c.aux_loss = false;
  c.seed = 7;
  c.validate();
  return c;
}

std::function<void(int64_t)> make_decode_step(nn::Transformer model, int64_t vocab, int64_t B, int64_t position,
                                              int64_t cache_len, int64_t min_tokens) {
  auto cache = std::make_shared<nn::KVCache>(model->make_cache(B, cache_len));
  const auto tokens = torch::randint(0, vocab, {std::max<int64_t>(min_tokens, 4 * B), 1},
                                     at::detail::createCPUGenerator(5 + B), torch::kLong);  // [P, 1]
  return [model, cache, tokens, B, position](int64_t i) mutable {
    cache->length = position;
    model->forward_cached(tokens.narrow(0, (i * B) % (tokens.size(0) - B + 1), B), *cache);
  };
}

}  // namespace ultramem::perf
