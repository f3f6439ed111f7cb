// Next-token sampling and KV-cache generation with a trained language model.
#pragma once
#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "ultramem/nn/transformer.h"

namespace ultramem::infer {

struct SamplingOptions {
  double temperature = 0.8;  // 0: greedy (argmax)
  int64_t top_k = 0;         // keep the k most likely tokens; 0: all
  double top_p = 1.0;        // keep the smallest set with cumulative probability >= top_p; 1: all
  uint64_t seed = 0;
  int64_t max_tokens = 200;  // tokens to generate at most
  void validate() const;     // std::invalid_argument naming the field
};

// One token id drawn from logits [V] under `o` (temperature, then top-k, then top-p). Greedy: the first
// largest logit. Otherwise the kept tokens' probabilities softmax(logits / temperature) (top-k keeps the
// logits >= the k-th largest, ties included; top-p the smallest most-likely set whose mass reaches top_p)
// and one uniform draw of 53 bits from `gen` walked along their cumulative sum in token order: one
// random number per token, so a sequence's draws depend on its seed and its logits alone.
int64_t sample_token(const torch::Tensor& logits, const SamplingOptions& o, torch::Generator& gen);
// The same on a raw row: logits [V] float32. Thread-safe for distinct generators.
int64_t sample_token(const float* logits, int64_t V, const SamplingOptions& o, torch::Generator& gen);

// Wall-clock timing of one generate() call.
struct GenerateTiming {
  int64_t prompt_tokens = 0;          // tokens of the prompt actually used (context-truncated)
  double prompt_seconds = 0;          // the forward over the whole prompt
  std::vector<double> step_seconds;   // each single-token decode step (forward + sampling), in order
  std::string stop_reason;            // "eos", "max_tokens" or "context_full"
};

// Continues `prompt` (token ids, non-empty) with KV-cache decoding until `eos_id` is produced (not
// emitted), max_tokens are produced, or the model's context is full. A prompt longer than the context
// keeps its last tokens. Calls on_token for each new id as it is produced; returns the new ids. Runs
// under torch::InferenceMode (no autograd state; memory layers take their no-grad fast path). Fills
// *timing when given. It is generate_batch with one prompt.
std::vector<int64_t> generate(nn::Transformer& model, std::vector<int64_t> prompt, const SamplingOptions& o,
                              int64_t eos_id, const std::function<void(int64_t)>& on_token = {},
                              GenerateTiming* timing = nullptr);

// Several prompts continued together, one batch through the decode path per step. All sequences share
// the cache's length: the first min(prompt lengths) tokens are one prefill, after which every step
// feeds each sequence its next prompt token while it has one and its sampled token after. Each
// sequence samples with its own generator seeded with o.seed (the draws it would make alone) and stops
// on its own (eos, max_tokens, context_full); a stopped sequence is fed its last token (its outputs
// ignored) until all have stopped. Calls on_token(b, id) for each new id of sequence b as it is
// produced. Returns the new ids per prompt, each sequence's stop reason and the timing.
struct BatchResult {
  std::vector<std::vector<int64_t>> tokens;  // [B] new ids per prompt
  std::vector<std::string> stop_reasons;     // [B] "eos", "max_tokens" or "context_full"
  int64_t steps = 0;                         // batched decode steps after the prefill
  double prefill_seconds = 0;                // the prefill forward and the first sampling
  double decode_seconds = 0;                 // the decode steps, all together
  std::vector<double> step_seconds;          // [steps] each decode step (forward + sampling), in order
};
BatchResult generate_batch(nn::Transformer& model, std::vector<std::vector<int64_t>> prompts, const SamplingOptions& o,
                           int64_t eos_id, const std::function<void(int64_t seq, int64_t id)>& on_token = {});

}  // namespace ultramem::infer
