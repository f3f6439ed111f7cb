#include "ultramem/experiment/harness.h"

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <stdexcept>

#include "ultramem/data/prepared.h"
#include "ultramem/experiment/report.h"
#include "ultramem/experiment/run.h"
#include "ultramem/experiment/suite.h"

namespace ultramem::experiment {
namespace {
namespace fs = std::filesystem;

// The command that prepares a suite's LM data folder, for messages.
std::string prepare_command(const ExperimentSuite& suite) {
  const auto vocab = suite.runs.empty() ? nlohmann::json() : suite.runs.front().model.value("vocab_size", nlohmann::json());
  return "ultramem prepare" + (vocab.is_number_integer() ? " --vocab " + std::to_string(vocab.get<int64_t>()) : "") +
         " --out " + suite.data_dir;
}

// Prints each run's parameters and FLOPs without training. Without the suite's prepared data the sizes
// use the vocabulary of the suite's model configs, and a note names the command that prepares it.
void print_plan(const ExperimentSuite& suite, std::ostream& out) {
  bool have_data = suite.task != "lm";
  if (!have_data) {
    try {
      data::load_prepared(suite.data_dir);
      have_data = true;
    } catch (const std::exception&) {
    }
  }
  if (!have_data)
    out << "note: " << suite.data_dir << " is not prepared; sizes below use the vocab_size of the suite's models. "
        << "Prepare it before training with: " << prepare_command(suite) << "\n";
  out << std::left << std::setw(44) << "run" << std::right << std::setw(14) << "params" << std::setw(14)
      << "activated" << std::setw(14) << "MFLOP/token" << std::setw(8) << "seeds" << "\n";
  for (const auto& r : suite.runs) {
    nlohmann::json mc = r.model;
    if (have_data) {
      mc = case_model_config(suite, r, r.seeds.front());
    } else {
      mc["seed"] = r.seeds.front();
    }
    const auto s = model_summary(mc);
    out << std::left << std::setw(44) << (r.name + " (" + r.label + ")").substr(0, 43) << std::right << std::setw(14)
        << s["params_total"].get<int64_t>() << std::setw(14) << s["params_activated"].get<int64_t>() << std::setw(14)
        << std::fixed << std::setprecision(3) << s["flops_per_token"].get<double>() / 1e6 << std::setw(8)
        << r.seeds.size() << "\n";
  }
}

}  // namespace

void run_harness(const HarnessOptions& a, std::ostream& out) {
  if (a.list || a.suite.empty()) {
    out << "experiment suites in experiments/:\n";
    for (const auto& s : list_suites()) {
      const auto suite = load_suite(s, false);
      out << "  " << s << ": " << suite.title << " (" << suite.runs.size() << " runs)\n";
    }
    if (!a.list) throw std::invalid_argument("name a suite: ultramem experiment SUITE [--quick]");
    return;
  }
  auto suite = load_suite(a.suite, a.quick);
  if (!a.data.empty()) suite.data_dir = a.data;
  if (!a.only.empty()) {
    std::vector<ExperimentRun> kept;
    for (const auto& r : suite.runs)
      if (std::find(a.only.begin(), a.only.end(), r.name) != a.only.end()) kept.push_back(r);
    if (kept.empty()) throw std::invalid_argument("--only selects none of the suite's runs");
    suite.runs = kept;
  }
  if (a.plan) {
    print_plan(suite, out);
    return;
  }
  if (suite.task == "lm" && !a.report_only) {
    try {
      data::load_prepared(suite.data_dir);
    } catch (const std::exception& e) {
      throw std::invalid_argument(std::string(e.what()) + "\nprepare the suite's data first: " + prepare_command(suite));
    }
  }
  const std::string dir = !a.out.empty() ? a.out : "runs/experiments/" + suite.name + (a.quick ? "-quick" : "");
  size_t total = 0;
  for (const auto& r : suite.runs) total += r.seeds.size();
  out << "experiment " << suite.name << (a.quick ? " (quick)" : "") << ": " << suite.title << "; " << suite.runs.size()
      << " runs, " << total << " cases -> " << dir << std::endl;

  std::vector<std::pair<const ExperimentRun*, uint64_t>> order;
  size_t max_seeds = 0;
  for (const auto& r : suite.runs) max_seeds = std::max(max_seeds, r.seeds.size());
  for (size_t k = 0; k < max_seeds; ++k)
    for (const auto& r : suite.runs)
      if (k < r.seeds.size()) order.emplace_back(&r, r.seeds[k]);

  // The ETA counts the cases still to train (no run.json yet) at the mean time of those trained so far.
  size_t pending = 0;
  for (const auto& [run_ptr, seed] : order) pending += fs::exists(case_dir(dir, *run_ptr, seed) + "/run.json") ? 0 : 1;
  const std::string revision = git_revision();  // before training: the checkout may change meanwhile
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<CaseResult> cases;
  size_t done = 0, trained = 0;
  for (const auto& [run_ptr, seed] : order) {
    const ExperimentRun& run = *run_ptr;
    ++done;
    if (a.report_only) {
      if (!fs::exists(case_dir(dir, run, seed) + "/run.json")) continue;
    } else {
      const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      out << "\n== case " << done << "/" << total << ": " << run.label << ", seed " << seed;
      if (trained > 0 && elapsed > 0)
        out << " (" << std::fixed << std::setprecision(0) << elapsed << " s so far, about "
            << elapsed / double(trained) * double(pending > trained ? pending - trained : 0) << " s left)";
      out << std::endl;
    }
    auto res = run_case(suite, run, seed, dir, out);
    if (!a.report_only && !res.skipped) ++trained;
    if (!res.final.is_null()) cases.push_back(std::move(res));
  }
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const auto md = write_report(suite, cases, dir, !a.no_plot, a.report_only ? 0.0 : wall, out, revision);
  out << "\n" << md << "\nwrote " << dir << "/results.md and results.json" << std::endl;
}

}  // namespace ultramem::experiment
