// Timing of repeated calls for the benchmarks: robust medians on a shared, noisy machine.
#pragma once
#include <chrono>
#include <cstdint>
#include <functional>

namespace ultramem::perf {

using Clock = std::chrono::steady_clock;
// Seconds from t0 to now.
inline double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

struct Timing {
  double median = 0, min = 0, max = 0;  // seconds per call
  int repeats = 0;                      // timed calls
};

// One warm-up call (two when calls are cheap), then at least `repeats` timed calls and at least
// min_seconds of them (short calls: many samples, so that a burst of interruptions on a shared
// machine cannot take the median), stopping early once 3 ran and `budget` seconds passed.
// call(i) must use input i (callers rotate their inputs).
Timing time_calls(const std::function<void(int64_t)>& call, int repeats, double budget, double min_seconds);

// Two variants of one case timed in alternation (a then b, then b then a, ...) under the same rules, so
// that the drift of a shared machine falls on both: their timings and the median over pairs of a / b.
struct PairedTiming {
  Timing a, b;
  double ratio = 0;  // median over pairs of time(a) / time(b)
};
PairedTiming time_calls_paired(const std::function<void(int64_t)>& a, const std::function<void(int64_t)>& b,
                               int repeats, double budget, double min_seconds);

}  // namespace ultramem::perf
