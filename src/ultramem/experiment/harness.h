// The experiment harness: runs a suite's cases in seed-major order (every run's first seed before any
// run's second, so an interrupted suite already compares all runs), skipping finished cases and
// resuming interrupted ones, then writes the report (report.h).
#pragma once
#include <iosfwd>
#include <string>
#include <vector>

namespace ultramem::experiment {

struct HarnessOptions {
  std::string suite;               // a name in experiments/ or a path to a suite file
  std::string out;                 // output folder (default runs/experiments/<SUITE>[-quick])
  std::string data;                // prepared data folder of LM suites (overrides the suite's)
  std::vector<std::string> only;   // train only these runs
  bool quick = false;              // the suite's quick variant
  bool report_only = false;        // no training: rebuild the report from finished cases
  bool no_plot = false;            // no PNG charts
  bool list = false;               // list the suites and stop
  bool plan = false;               // print each run's size and stop (needs no prepared data)
};

// Runs the harness; progress and the report go to `out`. Throws std::invalid_argument for a bad suite
// or option (e.g. --only selecting nothing) and std::runtime_error for a failed case.
void run_harness(const HarnessOptions& options, std::ostream& out);

}  // namespace ultramem::experiment
