#include "experiment_run.h"

#include <torch/torch.h>

#include <cmath>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <memory>
#include <optional>

#include "run_files.h"
#include "ultramem/data/facts.h"
#include "ultramem/data/prepared.h"
#include "ultramem/data/sampler.h"
#include "ultramem/data/shard.h"
#include "ultramem/nn/model_config.h"
#include "ultramem/nn/model_info.h"
#include "ultramem/nn/transformer.h"
#include "ultramem/train/checkpoint.h"
#include "ultramem/train/train_config.h"
#include "ultramem/train/trainer.h"
#include "ultramem/train/transformer_model.h"

namespace ultramem::cli {
namespace {
namespace fs = std::filesystem;
using nlohmann::json;

data::FactTaskConfig fact_config(const json& j) {
  data::FactTaskConfig c;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const auto& k = it.key();
    if (!it->is_number_integer()) throw std::invalid_argument("facts." + k + ": expected an integer");
    const auto v = it->get<int64_t>();
    if (k == "subjects") c.subjects = v;
    else if (k == "subject_len") c.subject_len = v;
    else if (k == "alphabet") c.alphabet = v;
    else if (k == "relations") c.relations = v;
    else if (k == "objects") c.objects = v;
    else if (k == "context_facts") c.context_facts = v;
    else if (k == "max_queries") c.max_queries = v;
    else if (k == "seed") c.seed = uint64_t(v);
    else throw std::invalid_argument("facts." + k + ": unknown key");
  }
  c.validate();
  return c;
}

// Batches of one case: the training source and the fixed evaluation batches.
struct CaseData {
  train::BatchSource source;
  std::vector<train::Batch> eval;
  std::shared_ptr<data::FactTask> facts;  // task facts only
};

CaseData lm_data(const std::string& dir, const nn::ModelConfig& mc, const train::TrainConfig& tc) {
  const auto prepared = data::load_prepared(dir);
  if (prepared.vocab_size != mc.vocab_size)
    throw std::invalid_argument("model vocab_size " + std::to_string(mc.vocab_size) + " differs from the data's " +
                                std::to_string(prepared.vocab_size) + " (" + dir + ")");
  CaseData d;
  auto sampler = std::make_shared<data::BatchSampler>(data::TokenShard::open(prepared.train_path), tc.batch_size,
                                                      tc.seq_len, tc.seed);
  d.source.next = [sampler] {
    auto b = sampler->next();
    return train::Batch{std::move(b.inputs), std::move(b.targets)};
  };
  d.source.position = [sampler] { return sampler->position(); };
  d.source.set_position = [sampler](int64_t k) { sampler->set_position(k); };
  const auto val = data::TokenShard::open(prepared.val_path);
  for (auto& b : data::eval_batches(*val, tc.batch_size, tc.seq_len, tc.eval_batches))
    d.eval.push_back({std::move(b.inputs), std::move(b.targets)});
  return d;
}

CaseData fact_data(const data::FactTaskConfig& fc, const train::TrainConfig& tc) {
  CaseData d;
  d.facts = std::make_shared<data::FactTask>(fc);
  auto position = std::make_shared<int64_t>(0);
  auto task = d.facts;
  const uint64_t stream = tc.seed;  // the training seed picks the data order; the facts stay the same
  d.source.next = [task, position, tc, stream] {
    train::Batch b;
    task->batch((*position)++, tc.batch_size, tc.seq_len, stream * 2, b.inputs, b.targets);
    return b;
  };
  d.source.position = [position] { return *position; };
  d.source.set_position = [position](int64_t k) { *position = k; };
  for (int64_t i = 0; i < std::max<int64_t>(tc.eval_batches, 1); ++i) {
    train::Batch b;
    task->batch(i, tc.batch_size, tc.seq_len, /*stream=*/1'000'001, b.inputs, b.targets);
    d.eval.push_back(std::move(b));
  }
  return d;
}

// Recall and object loss of the model on the task's query set (eval mode, no grad).
json fact_recall(nn::Transformer& model, const data::FactTask& task) {
  torch::NoGradGuard no_grad;
  model->eval();
  const auto q = task.queries();
  const int64_t Q = q.inputs.size(0), chunk = 256;
  int64_t correct = 0;
  double loss = 0;
  for (int64_t i = 0; i < Q; i += chunk) {
    const int64_t n = std::min(chunk, Q - i);
    const auto logits = model->forward(q.inputs.narrow(0, i, n));          // [n, L, V]
    const auto pos = q.positions.narrow(0, i, n);
    const auto at = logits.index({torch::arange(n), pos});                  // [n, V]
    const auto obj = q.objects.narrow(0, i, n);
    correct += at.argmax(-1).eq(obj).sum().item<int64_t>();
    loss += torch::nn::functional::cross_entropy(at.to(torch::kDouble), obj,
                                                 torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum))
                .item<double>();
  }
  model->train();
  const double recall = double(correct) / double(Q);
  return {{"recall", recall}, {"object_loss", loss / double(Q)}, {"queries", Q},
          {"facts", task.config().num_facts()}, {"facts_recalled", recall * double(task.config().num_facts())}};
}

}  // namespace

std::string case_dir(const std::string& suite_dir, const ExperimentRun& run, uint64_t seed) {
  return (fs::path(suite_dir) / (run.name + "-s" + std::to_string(seed))).string();
}

json case_model_config(const ExperimentSuite& suite, const ExperimentRun& run, uint64_t seed) {
  json mj = run.model;
  mj["seed"] = seed;
  // The vocabulary comes from the data: the task's layout, or the prepared data's tokenizer.
  mj["vocab_size"] = suite.task == "facts" ? fact_config(suite.facts).vocab_size()
                                           : data::load_prepared(suite.data_dir).vocab_size;
  return mj;
}

json model_summary(const json& model_config) {
  const auto info = nn::model_info(nn::model_config_from_json(model_config));
  return {{"params_total", info.params_total}, {"params_activated", info.params_activated},
          {"flops_per_token", info.flops_per_token}};
}

CaseResult run_case(const ExperimentSuite& suite, const ExperimentRun& run, uint64_t seed, const std::string& suite_dir,
                    std::ostream& log) {
  CaseResult res;
  res.run = run.name;
  res.label = run.label;
  res.seed = seed;
  res.tags = run.tags;
  res.dir = case_dir(suite_dir, run, seed);

  std::optional<data::FactTaskConfig> fc;
  if (suite.task == "facts") fc = fact_config(suite.facts);
  const auto mc = nn::model_config_from_json(case_model_config(suite, run, seed));
  json tj = run.train;
  tj["seed"] = seed;
  tj["out_dir"] = res.dir;
  const auto tc = train::train_config_from_json(tj);
  res.model = nn::model_config_to_json(mc);
  const auto info = nn::model_info(mc);
  res.info = model_summary(res.model);

  const json identity = {{"model", res.model}, {"train", train::train_config_to_json(tc)},
                         {"task", suite.task}, {"facts", suite.facts}, {"data", suite.data_dir}};
  const auto record_path = run_record_path(res.dir);
  if (fs::exists(record_path)) {
    const auto rec = read_json_file(record_path);
    const auto diffs = train::config_differences(rec.value("identity", json::object()), identity);
    if (!diffs.empty()) {
      std::string list;
      for (const auto& d : diffs) list += "\n  " + d;
      throw std::invalid_argument(res.dir + " holds a run of another configuration; delete the folder or use --out:" +
                                  list);
    }
    if (rec.contains("final")) {
      res.final = rec["final"];
      res.skipped = true;
      log << "[" << run.name << " seed " << seed << "] done earlier: val loss " << std::fixed << std::setprecision(4)
          << res.final.value("val_loss", NAN) << " (" << res.dir << ")" << std::endl;
      return res;
    }
  }

  fs::create_directories(res.dir);
  json record = {{"suite", suite.name}, {"run", run.name}, {"seed", seed}, {"identity", identity}};
  if (suite.task == "lm") record["data_dir"] = suite.data_dir;  // for `ultramem eval` / `generate`
  write_json_file(record_path, record);
  log << "[" << run.name << " seed " << seed << "] " << info.params_total << " params, " << info.params_activated
      << " activated, " << std::setprecision(4) << info.flops_per_token / 1e6 << " MFLOP/token; " << tc.steps
      << " steps x " << tc.tokens_per_step() << " tokens -> " << res.dir << std::endl;

  torch::manual_seed(tc.seed);
  auto transformer = nn::Transformer(mc);
  auto model = train::as_trainable(transformer);
  CaseData d = suite.task == "facts" ? fact_data(*fc, tc) : lm_data(suite.data_dir, mc, tc);
  train::Trainer trainer(model, tc, d.source, std::move(d.eval), &log);
  const auto ckpt = (fs::path(res.dir) / "checkpoint.safetensors").string();
  if (fs::exists(ckpt)) {
    trainer.resume(ckpt);
    log << "resumed " << ckpt << " at step " << trainer.state().step << std::endl;
  }
  const auto& st = trainer.run();
  const double val = st.has_val_loss ? st.last_val_loss : trainer.evaluate();
  res.final = {{"step", st.step},          {"val_loss", val},           {"best_val_loss", st.best_val_loss},
               {"best_step", st.best_step}, {"tokens", st.tokens_seen}, {"train_seconds", st.train_seconds}};
  if (d.facts) res.final.update(fact_recall(transformer, *d.facts));
  record["final"] = res.final;
  write_json_file(record_path, record);
  log << "[" << run.name << " seed " << seed << "] val loss " << std::fixed << std::setprecision(4) << val;
  if (d.facts) log << ", recall " << res.final["recall"].get<double>();
  log << ", " << std::setprecision(0) << st.train_seconds << " s" << std::endl;
  return res;
}

}  // namespace ultramem::cli
