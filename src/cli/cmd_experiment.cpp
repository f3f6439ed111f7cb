// `ultramem experiment SUITE`: flags -> experiment::run_harness (experiment/harness.h).
#include <CLI/CLI.hpp>

#include <iostream>
#include <memory>

#include "commands.h"
#include "ultramem/experiment/harness.h"

namespace ultramem::cli {

void add_experiment_command(CLI::App& app) {
  auto a = std::make_shared<experiment::HarnessOptions>();
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
  cmd->add_flag("--plan", a->plan, "Print each run's parameters and FLOPs per token, and stop (needs no data)");
  cmd->callback([a] { experiment::run_harness(*a, std::cout); });
}

}  // namespace ultramem::cli
