// Training one case (run x seed) of an experiment suite, in process: on prepared LM data or on the
// synthetic fact task. A finished case is skipped (its run.json is read back); an interrupted one
// resumes from its checkpoint.
#pragma once
#include <cstdint>
#include <iosfwd>
#include <string>

#include <nlohmann/json.hpp>

#include "ultramem/experiment/suite.h"

namespace ultramem::experiment {

struct CaseResult {
  std::string run;         // ExperimentRun::name
  std::string label;
  uint64_t seed = 0;
  std::string dir;         // the case's run folder
  nlohmann::json tags;     // ExperimentRun::tags
  nlohmann::json model;    // the model config trained
  nlohmann::json info;     // params_total, params_activated, flops_per_token
  nlohmann::json final;    // step, val_loss, best_val_loss, tokens, train_seconds (+ recall, object_loss,
                           // facts for the fact task)
  bool skipped = false;    // finished earlier, read back
};

// The folder of a case: <suite_dir>/<run>-s<seed>.
std::string case_dir(const std::string& suite_dir, const ExperimentRun& run, uint64_t seed);

// The model config a case trains: the run's model with the seed and the data's vocabulary applied.
nlohmann::json case_model_config(const ExperimentSuite& suite, const ExperimentRun& run, uint64_t seed);

// Parameters and forward FLOPs per token of a model config (nn::model_info) as JSON.
nlohmann::json model_summary(const nlohmann::json& model_config);

// Trains (or skips / resumes) one case. Progress goes to `log`. Throws std::invalid_argument when the
// folder holds a run of a different config (names the differing keys) and std::runtime_error on
// training failures.
CaseResult run_case(const ExperimentSuite& suite, const ExperimentRun& run, uint64_t seed,
                    const std::string& suite_dir, std::ostream& log);

}  // namespace ultramem::experiment
