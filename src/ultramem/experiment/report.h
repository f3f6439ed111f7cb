// Results of an experiment suite: a markdown table and discussion aids per analysis kind, a JSON file
// with every case, and PNG charts drawn with gnuplot (validation-loss curves, plus a suite-specific
// chart). Written to the suite's output folder as results.md, results.json, *.png.
#pragma once
#include <iosfwd>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "ultramem/experiment/run.h"
#include "ultramem/experiment/suite.h"

namespace ultramem::experiment {

// Aggregates over the seeds of one run.
struct RunSummary {
  std::string run, label;
  nlohmann::json tags, info;
  std::vector<double> val;      // final validation loss per seed, in seed order
  double mean = 0, min = 0, max = 0, sd = 0;
  double recall = -1;           // mean over seeds (fact task), -1 when absent
  double facts_recalled = -1;   // mean over seeds (fact task)
  double seconds = 0;           // training wall time summed over seeds
  // Retrieval suites: per memory layer ("mem0", ...), the recall and score mass of every seed, in seed
  // order: {"mem0": {"recall": [...], "score_mass": [...]}, ...}.
  nlohmann::json retrieval = nlohmann::json::object();
};

std::vector<RunSummary> summarize(const ExperimentSuite& suite, const std::vector<CaseResult>& cases);

// Two runs differ only when their seed ranges [min, max] do not overlap (with one seed each: any
// difference counts, and the report says the spread is unknown).
bool seed_ranges_overlap(const RunSummary& a, const RunSummary& b);

// Least-squares fit y = a + b * ln(x). Returns {a, b, r2}.
struct LogFit {
  double a = 0, b = 0, r2 = 0;
};
LogFit fit_log(const std::vector<double>& x, const std::vector<double>& y);

// results.md (returned as well), results.json and, when `plot`, PNG charts (skipped with a note when
// gnuplot is missing). `wall_seconds`: wall time of this invocation. `revision`: the checkout's revision
// when this invocation started (git_revision(); the checkout may change while a suite trains); empty:
// read it now.
std::string write_report(const ExperimentSuite& suite, const std::vector<CaseResult>& cases, const std::string& dir,
                         bool plot, double wall_seconds, std::ostream& log, const std::string& revision = "");

// The checkout's short revision, with " (with uncommitted changes)" when tracked files differ; "unknown"
// outside a git checkout.
std::string git_revision();

}  // namespace ultramem::experiment
