// Validation loss of a language model over fixed batches (eval mode, no autograd state).
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "ultramem/data/facts.h"
#include "ultramem/data/prepared.h"
#include "ultramem/data/sampler.h"
#include "ultramem/nn/transformer.h"

namespace ultramem::infer {

struct LossResult {
  double loss = 0;     // mean next-token cross-entropy, nats per target token
  int64_t tokens = 0;  // target tokens scored
  std::vector<double> batch_seconds;  // the forward pass of each batch, in order
};

// Scores every target token of `batches` under torch::NoGradGuard. progress(done, total) runs after
// each batch when given. std::invalid_argument for an empty batch list.
LossResult mean_loss(nn::Transformer& model, const std::vector<data::Batch>& batches,
                     const std::function<void(size_t, size_t)>& progress = {});

// Recall of the fact task's queries (data/facts.h): the share answered with the right object token
// (argmax at the query position), and the mean object cross-entropy. Eval mode, no grad; the model's
// train/eval mode is restored. {"recall", "object_loss", "queries", "facts", "facts_recalled"}.
nlohmann::json fact_recall(nn::Transformer& model, const data::FactTask& task);

// Retrieval quality of every UltraMem layer over `batches` (their telemetry windows are reset first;
// each window checks its first retrieval_sample tokens against the exact top-m):
// {"mem0": {"recall", "score_mass", "tokens"}, ...}; null values where no token was checked.
nlohmann::json retrieval_quality(nn::Transformer& model, const std::vector<data::Batch>& batches);

// The validation split of `prepared` cut into batches for a model of config `cfg` (seq_len <= 0: the
// model's max_seq_len). std::invalid_argument for a vocabulary mismatch or seq_len above the context;
// std::runtime_error when the split holds not even one batch.
std::vector<data::Batch> validation_batches(const data::PreparedData& prepared, const nn::ModelConfig& cfg,
                                           int64_t batch_size, int64_t seq_len, int64_t max_batches);

struct EvalOptions {
  std::string checkpoint;   // checkpoint file
  std::string data_dir;     // prepared data ("" : the run's, see checkpoint::data_dir_for_checkpoint)
  int64_t batch_size = 8;   // sequences per batch
  int64_t seq_len = 0;      // tokens per sequence (0: the model's max_seq_len)
  int64_t max_batches = 0;  // at most this many batches (0: the whole split)
  bool mmap = false;        // value tables from a read-only mapping of the file
  std::string value_tables;  // a folder of value-table files (export-tables) served behind row caches; "": none
  double value_cache_gib = 4;  // the row caches' cap with value_tables
  std::string keys;  // key storage of the memory layers' fused path: fp32, bf16 or int8; "": the checkpoint's
  std::string weights;  // storage of the dense matrices (set_weight_format): fp32, bf16 or int8; "": the checkpoint's
  std::string filter;          // retrieval filter override: rank1 | two_sign | rank_r ("": as trained)
  int64_t filter_m_neg = 0;    // two_sign: candidates per side from the negative end (0: m_first / 2)
  int64_t filter_rank = 0;     // rank_r: filter scores per side (0: r)
  int64_t filter_m_first = 0;  // first-stage candidates per side (0: as trained)
};

// `ultramem eval`: validation loss, perplexity, bits per byte, value format and size, first-batch and
// later-batch latency, peak memory and the memory layers' telemetry, as one JSON object. A live batch
// counter goes to stderr when it is a terminal. std::invalid_argument for inconsistent options.
nlohmann::json evaluate_checkpoint(const EvalOptions& options);

}  // namespace ultramem::infer
