#include "ultramem/perf/timing.h"

#include <algorithm>
#include <chrono>
#include <vector>

namespace ultramem::perf {
namespace {
using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }
}  // namespace

Timing time_calls(const std::function<void(int64_t)>& call, int repeats, double budget, double min_seconds) {
  auto t0 = Clock::now();
  call(0);
  int64_t i = 1;
  if (seconds_since(t0) * 20 < budget) call(i++);
  std::vector<double> t;
  const auto start = Clock::now();
  while (int(t.size()) < repeats || seconds_since(start) < min_seconds) {
    const auto a = Clock::now();
    call(i++);
    t.push_back(seconds_since(a));
    if (t.size() >= 3 && seconds_since(start) > budget) break;
  }
  std::sort(t.begin(), t.end());
  Timing r;
  const size_t n = t.size();
  r.median = n % 2 ? t[n / 2] : 0.5 * (t[n / 2 - 1] + t[n / 2]);
  r.min = t.front();
  r.max = t.back();
  r.repeats = int(n);
  return r;
}

}  // namespace ultramem::perf
