// Private to the kernels folder: deterministic top-k selection under the ordering contract of
// tdqkr.h (score descending, ties by smaller id, NaN last).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace ultramem::kernels {

template <typename T>
struct Ranked {
  T score;      // ranking score
  int64_t id;   // tie-break key (row/col index or grid address)
  int64_t pos;  // caller's payload (position in its candidate list)
};

// Strict weak order: non-NaN before NaN; then score descending; then smaller id.
template <typename T>
inline bool ranks_before(const Ranked<T>& a, const Ranked<T>& b) {
  const bool a_nan = std::isnan(a.score), b_nan = std::isnan(b.score);
  if (a_nan != b_nan) return b_nan;
  if (a_nan) return a.id < b.id;
  return a.score > b.score || (a.score == b.score && a.id < b.id);
}

// Reorders c so that its first k elements are the k best, sorted best first.
template <typename T>
inline void select_top(std::vector<Ranked<T>>& c, int64_t k) {
  // A lambda (not a function pointer) so the comparator is inlined into the selection.
  const auto before = [](const Ranked<T>& a, const Ranked<T>& b) { return ranks_before(a, b); };
  if (k < static_cast<int64_t>(c.size())) {
    std::nth_element(c.begin(), c.begin() + k, c.end(), before);
  }
  std::sort(c.begin(), c.begin() + std::min<int64_t>(k, c.size()), before);
}

}  // namespace ultramem::kernels
