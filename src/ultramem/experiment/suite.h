// Experiment suites (`ultramem experiment NAME`): a named set of training runs that share data,
// steps and seeds, read from experiments/<NAME>.json. Format (docs/results.md has the full story):
//
//   {"name": "compare", "title": "...", "analysis": "compare" | "ablation" | "capacity" | "scaling" | "retrieval",
//    "task": "lm" | "facts",
//    "data": "data/prepared/sotu-v8192",         (task "lm")
//    "facts": {FactTaskConfig keys},              (task "facts")
//    "seeds": [0, 1, 2],
//    "base_model": {ModelConfig JSON},
//    "train": {TrainConfig keys},
//    "cumulative": false,                         true: each run's model patch applies on top of the
//                                                 previous run's model (an ablation ladder)
//    "runs": [{"name": "dense", "label": "Dense", "model": {JSON merge patch}, "train": {...},
//              "seeds": [...], "tags": {...}}, ...],
//    "quick": {"train": {...}, "model": {merge patch for every run}, "seeds": [0],
//              "runs": ["dense", "ultramem"], "facts": {...}}}
//
// A run's seed sets both the model seed (weights, memory permutations) and the training seed (data order).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace ultramem::experiment {

struct ExperimentRun {
  std::string name;             // unique within the suite; names the run folder
  std::string label;            // for tables and plots
  nlohmann::json model;         // complete ModelConfig JSON (seed applied per case)
  nlohmann::json train;         // TrainConfig keys (seed and out_dir applied per case)
  nlohmann::json tags;          // free-form values the analysis reads (e.g. "N", "paper_delta")
  std::vector<uint64_t> seeds;  // seeds this run is trained with
};

struct ExperimentSuite {
  std::string name;
  std::string title;
  std::string analysis;         // compare | ablation | capacity | scaling | retrieval
  std::string task;             // lm | facts
  std::string data_dir;         // prepared data (task lm)
  nlohmann::json facts;         // FactTaskConfig JSON (task facts)
  std::string source_path;      // the suite file
  bool quick = false;           // the quick variant was selected
  std::vector<ExperimentRun> runs;
};

// Finds experiments/<name>.json (or takes a path), applies the quick variant when asked and
// resolves every run's model and train settings. Throws std::invalid_argument naming the file and key.
ExperimentSuite load_suite(const std::string& name_or_path, bool quick);

// Names of the suite files in experiments/ (without .json), sorted.
std::vector<std::string> list_suites(const std::string& dir = "experiments");

}  // namespace ultramem::experiment
