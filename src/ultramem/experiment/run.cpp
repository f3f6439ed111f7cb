#include "ultramem/experiment/run.h"

#include <cmath>
#include <filesystem>
#include <iomanip>
#include <ostream>

#include "ultramem/checkpoint/checkpoint.h"
#include "ultramem/checkpoint/run_folder.h"
#include "ultramem/data/prepared.h"
#include "ultramem/infer/evaluate.h"
#include "ultramem/io/json_file.h"
#include "ultramem/nn/model_config.h"
#include "ultramem/nn/model_info.h"
#include "ultramem/train/run.h"
#include "ultramem/train/train_config.h"

namespace ultramem::experiment {
namespace {
namespace fs = std::filesystem;
using nlohmann::json;

train::RunData case_data(const ExperimentSuite& suite) {
  train::RunData d;
  d.task = suite.task;
  d.data_dir = suite.data_dir;
  d.facts = suite.facts;
  return d;
}

}  // namespace

std::string case_dir(const std::string& suite_dir, const ExperimentRun& run, uint64_t seed) {
  return (fs::path(suite_dir) / (run.name + "-s" + std::to_string(seed))).string();
}

json case_model_config(const ExperimentSuite& suite, const ExperimentRun& run, uint64_t seed) {
  json mj = run.model;
  mj["seed"] = seed;
  // The vocabulary comes from the data: the task's layout, or the prepared data's tokenizer.
  mj["vocab_size"] = train::data_vocab_size(case_data(suite));
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
  const auto record_path = checkpoint::run_record_path(res.dir);
  if (fs::exists(record_path)) {
    const auto rec = io::read_json_file(record_path);
    json recorded = rec.value("identity", json::object());
    // A train key the record lacks (written before the key existed) had its default: compare the recorded
    // settings read back through the config, which fills them in.
    if (recorded.contains("train") && recorded["train"].is_object()) {
      try {
        recorded["train"] = train::train_config_to_json(train::train_config_from_json(recorded["train"]));
      } catch (const std::exception&) {
        // An unreadable record is compared as it is (and differs).
      }
    }
    // Where the case lives is not what it is: a suite folder moved or copied (--out) still reports.
    json current = identity;
    for (json* j : {&recorded, &current})
      if (j->contains("train") && (*j)["train"].is_object()) (*j)["train"].erase("out_dir");
    const auto diffs = checkpoint::config_differences(recorded, current);
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
  log << "[" << run.name << " seed " << seed << "] " << info.params_total << " params, " << info.params_activated
      << " activated, " << std::setprecision(4) << info.flops_per_token / 1e6 << " MFLOP/token; " << tc.steps
      << " steps x " << tc.tokens_per_step() << " tokens -> " << res.dir << std::endl;

  train::RunOptions o;
  o.model = res.model;
  o.train = train::train_config_to_json(tc);
  o.data = case_data(suite);
  o.resume = train::Resume::kIfPresent;
  o.log = &log;
  o.record = {{"suite", suite.name}, {"run", run.name}, {"seed", seed}, {"identity", identity}};
  train::TrainingRun tr(std::move(o));
  if (tr.facts()) {
    const auto task = tr.facts();
    tr.final_extra = [task](nn::Transformer& m) { return infer::fact_recall(m, *task); };
  } else if (suite.analysis == "retrieval") {
    // Retrieval quality of the trained model on validation tokens (2 batches; each memory layer checks
    // its first retrieval_sample tokens against the exact top-m).
    const auto prepared = data::load_prepared(suite.data_dir);
    const int64_t batch = tc.batch_size, len = tc.seq_len;
    tr.final_extra = [prepared, batch, len](nn::Transformer& m) {
      const auto batches = infer::validation_batches(prepared, m->config(), batch, len, 2);
      return json{{"retrieval", infer::retrieval_quality(m, batches)}};
    };
  }
  tr.run();
  res.final = tr.record()["final"];
  log << "[" << run.name << " seed " << seed << "] val loss " << std::fixed << std::setprecision(4)
      << res.final["val_loss"].get<double>();
  if (tr.facts()) log << ", recall " << res.final["recall"].get<double>();
  log << ", " << std::setprecision(0) << res.final["train_seconds"].get<double>() << " s" << std::endl;
  return res;
}

}  // namespace ultramem::experiment
