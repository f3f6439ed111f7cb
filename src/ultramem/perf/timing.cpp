#include "ultramem/perf/timing.h"

#include <algorithm>
#include <chrono>
#include <vector>

namespace ultramem::perf {
namespace {

double median_of(std::vector<double> t) {
  std::sort(t.begin(), t.end());
  const size_t n = t.size();
  return n % 2 ? t[n / 2] : 0.5 * (t[n / 2 - 1] + t[n / 2]);
}

Timing summary(std::vector<double> t) {
  std::sort(t.begin(), t.end());
  Timing r;
  r.median = median_of(t);
  r.min = t.front();
  r.max = t.back();
  r.repeats = int(t.size());
  return r;
}

double time_one(const std::function<void(int64_t)>& call, int64_t i) {
  const auto a = Clock::now();
  call(i);
  return seconds_since(a);
}

}  // namespace

Timing time_calls(const std::function<void(int64_t)>& call, int repeats, double budget, double min_seconds) {
  auto t0 = Clock::now();
  call(0);
  int64_t i = 1;
  if (seconds_since(t0) * 20 < budget) call(i++);
  std::vector<double> t;
  const auto start = Clock::now();
  while (int(t.size()) < repeats || seconds_since(start) < min_seconds) {
    t.push_back(time_one(call, i++));
    if (t.size() >= 3 && seconds_since(start) > budget) break;
  }
  return summary(std::move(t));
}

PairedTiming time_calls_paired(const std::function<void(int64_t)>& a, const std::function<void(int64_t)>& b,
                               int repeats, double budget, double min_seconds) {
  a(0);
  b(0);
  int64_t i = 1;
  std::vector<double> ta, tb, ratio;
  const auto start = Clock::now();
  while (int(ta.size()) < repeats || seconds_since(start) < min_seconds) {
    double x, y;
    if (ta.size() % 2 == 0) {
      x = time_one(a, i);
      y = time_one(b, i);
    } else {
      y = time_one(b, i);
      x = time_one(a, i);
    }
    ++i;
    ta.push_back(x);
    tb.push_back(y);
    ratio.push_back(x / y);
    if (ta.size() >= 3 && seconds_since(start) > budget) break;
  }
  PairedTiming r;
  r.ratio = median_of(ratio);
  r.a = summary(std::move(ta));
  r.b = summary(std::move(tb));
  return r;
}

}  // namespace ultramem::perf
