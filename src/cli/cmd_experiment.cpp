// `ultramem experiment SUITE`: trains every case of an experiment suite (experiments/<SUITE>.json) in
// sequence with the same data, steps and seeds, skipping finished cases and resuming interrupted ones,
// then writes results.md, results.json and charts to the suite's output folder.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <iomanip>
#include <filesystem>
#include <iostream>
#include <memory>

#include "commands.h"
#include "experiment_report.h"
#include "experiment_run.h"
#include "experiment_suite.h"

namespace ultramem::cli {
namespace {
namespace fs = std::filesystem;

struct ExperimentArgs {
  std::string suite;
  std::string out;
  std::string data;
  std::vector<std::string> only;
  bool quick = false;
  bool report_only = false;
  bool no_plot = false;
  bool list = false;
  bool plan = false;
};

// Prints each run's parameters and FLOPs without training (--plan).
void print_plan(const ExperimentSuite& suite) {
  std::cout << std::left << std::setw(44) << "run" << std::right << std::setw(14) << "params" << std::setw(14)
            << "activated" << std::setw(14) << "MFLOP/token" << std::setw(8) << "seeds" << "\n";
  for (const auto& r : suite.runs) {
    const auto s = model_summary(case_model_config(suite, r, r.seeds.front()));
    std::cout << std::left << std::setw(44) << (r.name + " (" + r.label + ")").substr(0, 43) << std::right
              << std::setw(14) << s["params_total"].get<int64_t>() << std::setw(14)
              << s["params_activated"].get<int64_t>() << std::setw(14) << std::fixed << std::setprecision(3)
              << s["flops_per_token"].get<double>() / 1e6 << std::setw(8) << r.seeds.size() << "\n";
  }
}

void run_experiment(const ExperimentArgs& a) {
  if (a.list || a.suite.empty()) {
    std::cout << "experiment suites in experiments/:\n";
    for (const auto& s : list_suites()) {
      const auto suite = load_suite(s, false);
      std::cout << "  " << s << ": " << suite.title << " (" << suite.runs.size() << " runs)\n";
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
    print_plan(suite);
    return;
  }
  const std::string dir = !a.out.empty() ? a.out : "runs/experiments/" + suite.name + (a.quick ? "-quick" : "");
  size_t total = 0;
  for (const auto& r : suite.runs) total += r.seeds.size();
  std::cout << "experiment " << suite.name << (a.quick ? " (quick)" : "") << ": " << suite.title << "; "
            << suite.runs.size() << " runs, " << total << " cases -> " << dir << std::endl;

  // Seed-major order: every run's first seed before any run's second, so an interrupted suite already
  // compares all runs.
  std::vector<std::pair<const ExperimentRun*, uint64_t>> order;
  size_t max_seeds = 0;
  for (const auto& r : suite.runs) max_seeds = std::max(max_seeds, r.seeds.size());
  for (size_t k = 0; k < max_seeds; ++k)
    for (const auto& r : suite.runs)
      if (k < r.seeds.size()) order.emplace_back(&r, r.seeds[k]);

  const auto t0 = std::chrono::steady_clock::now();
  std::vector<CaseResult> cases;
  size_t done = 0;
  for (const auto& [run_ptr, seed] : order) {
      const ExperimentRun& run = *run_ptr;
      ++done;
      if (a.report_only) {
        if (!fs::exists(case_dir(dir, run, seed) + "/run.json")) continue;
      } else {
        std::cout << "\n== case " << done << "/" << total << ": " << run.label << ", seed " << seed << std::endl;
      }
      auto res = run_case(suite, run, seed, dir, std::cout);
      if (!res.final.is_null()) cases.push_back(std::move(res));
  }
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const auto md = write_report(suite, cases, dir, !a.no_plot, a.report_only ? 0.0 : wall, std::cout);
  std::cout << "\n" << md << "\nwrote " << dir << "/results.md and results.json" << std::endl;
}

}  // namespace

void add_experiment_command(CLI::App& app) {
  auto a = std::make_shared<ExperimentArgs>();
  auto* cmd = app.add_subcommand(
      "experiment",
      "Run an experiment suite (experiments/<SUITE>.json: compare, ablation, capacity, scaling): trains its runs "
      "with the same data, steps and seeds, skips finished runs, resumes interrupted ones, and writes results.md, "
      "results.json and PNG charts (gnuplot) to runs/experiments/<SUITE>[-quick]/.");
  cmd->add_option("suite", a->suite, "Suite name (a file in experiments/) or path to a suite JSON file");
  cmd->add_flag("--quick", a->quick, "Run the suite's few-minute smoke variant (fewer steps, runs and seeds)");
  cmd->add_option("--out", a->out, "Output folder (default runs/experiments/<SUITE>[-quick])");
  cmd->add_option("--data", a->data, "Prepared data folder for language-modelling suites (overrides the suite's)");
  cmd->add_option("--only", a->only, "Train only these runs (names from the suite file; repeatable)");
  cmd->add_flag("--report-only", a->report_only, "Do not train: rebuild the report from the finished runs");
  cmd->add_flag("--no-plot", a->no_plot, "Skip the PNG charts");
  cmd->add_flag("--list", a->list, "List the available suites");
  cmd->add_flag("--plan", a->plan, "Print each run's parameters and FLOPs per token, and stop");
  cmd->callback([a] { run_experiment(*a); });
}

}  // namespace ultramem::cli
