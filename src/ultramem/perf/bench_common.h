// What the benchmarks share: their JSON-lines output, and a model's decode step to time.
#pragma once
#include <cstdint>
#include <fstream>
#include <functional>
#include <nlohmann/json_fwd.hpp>
#include <string>

#include "ultramem/nn/transformer.h"

namespace ultramem::perf {

// JSON lines on stdout and, when `path` is not empty, in that file too. who: the benchmark ("bench
// decode"), for the std::runtime_error when the file cannot be written.
class JsonLines {
 public:
  JsonLines(const std::string& who, const std::string& path);
  void operator()(const nlohmann::ordered_json& line);

 private:
  std::ofstream file_;
};

// The benchmarks' UltraMem layer: width D, n keys per side, IVE expansion E, key and value widths Dk
// and Dv, H heads keeping m values each (at most n), Tucker rank 2 with 2 cores, m_first = m, values
// N(0, 0.02^2), no telemetry and no aux loss, seed 7. Validated (std::invalid_argument).
nn::UltraMemConfig bench_layer_config(int64_t D, int64_t n, int64_t E, int64_t Dk, int64_t Dv, int64_t H, int64_t m);

// A decode step of B sequences: each call sets the KV cache (cache_len positions) back to `position`
// tokens and decodes one token per sequence; call i feeds the i-th slice of a fixed set of at least
// min_tokens random tokens in [0, vocab) (seeded by B), so that repeated calls differ.
std::function<void(int64_t)> make_decode_step(nn::Transformer model, int64_t vocab, int64_t B, int64_t position,
                                              int64_t cache_len, int64_t min_tokens = 4096);

}  // namespace ultramem::perf
