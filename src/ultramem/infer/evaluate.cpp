#include "ultramem/infer/value_table_files.h"
#include "ultramem/infer/evaluate.h"

#include <torch/torch.h>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <iostream>
#include <stdexcept>

#include "ultramem/checkpoint/run_folder.h"
#include "ultramem/data/prepared.h"
#include "ultramem/data/shard.h"
#include "ultramem/infer/model_loading.h"
#include "ultramem/infer/value_tables.h"
#include "ultramem/io/process_memory.h"

namespace ultramem::infer {

LossResult mean_loss(nn::Transformer& model, const std::vector<data::Batch>& batches,
                     const std::function<void(size_t, size_t)>& progress) {
  if (batches.empty()) throw std::invalid_argument("mean_loss: no batches to evaluate");
  torch::NoGradGuard no_grad;
  model->eval();
  double nll = 0;
  LossResult r;
  for (size_t i = 0; i < batches.size(); ++i) {
    const auto& b = batches[i];
    const auto t0 = std::chrono::steady_clock::now();
    const auto logits = model->forward(b.inputs);
    r.batch_seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    nll += torch::nn::functional::cross_entropy(
               logits.reshape({-1, logits.size(-1)}), b.targets.reshape(-1),
               torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum))
               .item<double>();
    r.tokens += b.targets.numel();
    if (progress) progress(i + 1, batches.size());
  }
  r.loss = nll / double(r.tokens);
  return r;
}

nlohmann::json fact_recall(nn::Transformer& model, const data::FactTask& task) {
  torch::NoGradGuard no_grad;
  const bool was_training = model->is_training();
  model->eval();
  const auto q = task.queries();
  const int64_t Q = q.inputs.size(0), chunk = 256;
  int64_t correct = 0;
  double loss = 0;
  for (int64_t i = 0; i < Q; i += chunk) {
    const int64_t n = std::min(chunk, Q - i);
    const auto logits = model->forward(q.inputs.narrow(0, i, n));  // [n, L, V]
    const auto pos = q.positions.narrow(0, i, n);                  // [n]
    const auto at = logits.index({torch::arange(n), pos});          // [n, V]
    const auto obj = q.objects.narrow(0, i, n);                     // [n]
    correct += at.argmax(-1).eq(obj).sum().item<int64_t>();
    loss += torch::nn::functional::cross_entropy(at.to(torch::kDouble), obj,
                                                 torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum))
                .item<double>();
  }
  model->train(was_training);
  const double recall = double(correct) / double(Q);
  return {{"recall", recall}, {"object_loss", loss / double(Q)}, {"queries", Q},
          {"facts", task.config().num_facts()}, {"facts_recalled", recall * double(task.config().num_facts())}};
}

nlohmann::json retrieval_quality(nn::Transformer& model, const std::vector<data::Batch>& batches) {
  model->telemetry();  // resets the windows
  mean_loss(model, batches);
  const auto t = model->telemetry();
  nlohmann::json out = nlohmann::json::object();
  for (auto it = t.begin(); it != t.end(); ++it) {
    const std::string& key = it.key();
    const auto dot = key.find('.');
    if (dot == std::string::npos) continue;
    const std::string layer = key.substr(0, dot), field = key.substr(dot + 1);
    if (field == "recall" || field == "score_mass") out[layer][field] = it.value();
    if (field == "retrieval_tokens") out[layer]["tokens"] = it.value();
  }
  return out;
}

std::vector<data::Batch> validation_batches(const data::PreparedData& prepared, const nn::ModelConfig& cfg,
                                           int64_t batch_size, int64_t seq_len, int64_t max_batches) {
  if (prepared.vocab_size != cfg.vocab_size)
    throw std::invalid_argument("the checkpoint's vocab_size " + std::to_string(cfg.vocab_size) +
                                " differs from the tokenizer's in " + prepared.dir);
  if (seq_len <= 0) seq_len = cfg.max_seq_len;
  if (seq_len > cfg.max_seq_len)
    throw std::invalid_argument("--seq-len " + std::to_string(seq_len) + " exceeds max_seq_len " +
                                std::to_string(cfg.max_seq_len));
  auto val = data::TokenShard::open(prepared.val_path);
  auto batches = data::eval_batches(*val, batch_size, seq_len, max_batches);
  if (batches.empty())
    throw std::runtime_error(prepared.val_path + ": too short for one batch of " + std::to_string(batch_size) +
                             " x " + std::to_string(seq_len) + " tokens; lower --batch-size or --seq-len");
  return batches;
}

nlohmann::json evaluate_checkpoint(const EvalOptions& a) {
  const auto t0 = std::chrono::steady_clock::now();
  LoadOptions lo;
  lo.mmap = a.mmap;
  lo.value_tables = a.value_tables;
  if (!a.value_tables.empty()) lo.value_cache_bytes = value_cache_bytes(a.value_cache_gib);
  if (!a.keys.empty()) lo.key_format = nn::parse_value_format(a.keys);
  if (!a.weights.empty()) lo.weight_format = nn::parse_value_format(a.weights);
  if (a.filter.empty() && (a.filter_m_neg != 0 || a.filter_m_first != 0 || a.filter_rank != 0))
    throw std::invalid_argument("--m-neg, --filter-rank and --m-first apply with --filter rank1|two_sign|rank_r");
  lo.filter = a.filter;
  lo.filter_m_neg = a.filter_m_neg;
  lo.filter_rank = a.filter_rank;
  lo.filter_m_first = a.filter_m_first;
  lo.warn = [](const std::string& s) { std::cerr << "note: " << s << std::endl; };
  auto loaded = load_model(a.checkpoint, lo);
  auto& model = loaded.model;
  const auto prepared = data::load_prepared(checkpoint::data_dir_for_checkpoint(a.checkpoint, a.data_dir));
  const auto batches = validation_batches(prepared, model->config(), a.batch_size, a.seq_len, a.max_batches);
  const bool progress = ::isatty(2);  // a live counter on a terminal only
  const auto r = mean_loss(model, batches, [&](size_t done, size_t total) {
    if (progress) std::cerr << "\reval batch " << done << "/" << total << std::flush;
  });
  if (progress) std::cerr << "\n";
  const double loss = r.loss;
  const auto telemetry = model->telemetry();
  // Compact keys: the same batches with the float keys, for the loss change they cost.
  nlohmann::json fp32_keys_loss = nullptr;
  if (loaded.key_format != nn::ValueFormat::kFloat32) {
    set_key_format(*model, nn::ValueFormat::kFloat32);
    fp32_keys_loss = mean_loss(model, batches).loss;
    set_key_format(*model, loaded.key_format);
  }
  // Per batch: the first one pays the first touch of the value tables.
  std::vector<double> batch_ms;
  for (double sec : r.batch_seconds) batch_ms.push_back(1e3 * sec);
  std::vector<double> later(batch_ms.begin() + 1, batch_ms.end());
  std::sort(later.begin(), later.end());
  // Bits per byte: nats/token -> bits/token, times the split's tokens per UTF-8 byte.
  const double bpb = loss / std::log(2.0) * double(prepared.val.tokens) / double(prepared.val.bytes);
  nlohmann::json out = {{"checkpoint", a.checkpoint},
                        {"data_dir", prepared.dir},
                        {"tokens", r.tokens},
                        {"val_loss", loss},
                        {"perplexity", std::exp(loss)},
                        {"bits_per_byte", bpb},
                        {"value_format", nn::to_string(loaded.value_format)},
                        {"value_mib", double(loaded.value_bytes) / double(1 << 20)},
                        {"key_format", nn::to_string(loaded.key_format)},
                        {"weight_format", nn::to_string(loaded.weight_format)},
                        {"filter", a.filter.empty() ? nlohmann::json("as trained") : nlohmann::json(a.filter)},
                        {"val_loss_fp32_keys", fp32_keys_loss},
                        {"key_loss_change", fp32_keys_loss.is_null() ? nlohmann::json(nullptr)
                                                                     : nlohmann::json(loss - fp32_keys_loss.get<double>())},
                        {"mmap", a.mmap},
                        {"first_batch_ms", batch_ms.front()},
                        {"median_later_batch_ms", later.empty() ? nlohmann::json(nullptr) : nlohmann::json(later[later.size() / 2])},
                        {"peak_rss_mib", double(io::peak_resident_bytes()) / double(1 << 20)},
                        {"seconds", std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()},
                        {"memory_layers", telemetry}};
  return out;
}


}  // namespace ultramem::infer
