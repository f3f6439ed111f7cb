// Private to the kernels folder: deterministic top-k selection under the ordering contract of
// tdqkr.h (score descending, ties by smaller id, NaN last).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

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

// Makes the first k elements of c the k best, sorted best first; the order of the rest is unspecified.
// Candidates' ids must be unique: the order is then total and the result unique, whichever way it is
// found.
template <typename T>
inline void select_top(std::vector<Ranked<T>>& c, int64_t k) {
  // A lambda (not a function pointer) so the comparator is inlined into the selection.
  const auto before = [](const Ranked<T>& a, const Ranked<T>& b) { return ranks_before(a, b); };
  const int64_t n = static_cast<int64_t>(c.size());
  k = std::min<int64_t>(std::max<int64_t>(k, 0), n);
  if (k > 0 && k <= 64 && n >= 8 * k) {
    // One pass keeping the k best in a sorted buffer (TDQKR: k = 32 of n = 512..4096 filter scores, or
    // of m_first^2 rescored candidates). A candidate that does not beat the current k-th is rejected by
    // one float compare (NaN scores fail it and take the full comparison).
    Ranked<T> best[64];
    int64_t filled = 0;
    for (int64_t i = 0; i < n; ++i) {
      const Ranked<T>& x = c[i];
      if (filled == k && (x.score < best[k - 1].score || !before(x, best[k - 1]))) continue;
      int64_t pos = filled < k ? filled++ : k - 1;
      while (pos > 0 && before(x, best[pos - 1])) {
        best[pos] = best[pos - 1];
        --pos;
      }
      best[pos] = x;
    }
    std::copy(best, best + k, c.begin());
    return;
  }
  if (k < n) std::nth_element(c.begin(), c.begin() + k, c.end(), before);
  std::sort(c.begin(), c.begin() + k, before);
}

// The k best (k <= 64) of a stream of candidates offered one by one, sorted best first.
template <typename T>
struct TopBuffer {
  explicit TopBuffer(int64_t k_) : k(k_) {}
  Ranked<T> best[64];
  int64_t filled = 0, k;
  // While true, only a candidate with score >= threshold() can enter (NaN scores never can).
  bool full_and_finite() const { return filled == k && !std::isnan(best[k - 1].score); }
  T threshold() const { return best[k - 1].score; }
  void offer(const Ranked<T>& c) {
    if (filled == k && !ranks_before(c, best[k - 1])) return;
    // Binary search for the first kept candidate c ranks before, then one block move.
    int64_t lo = 0, hi = filled;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (ranks_before(c, best[mid]))
        hi = mid;
      else
        lo = mid + 1;
    }
    const int64_t last = filled < k ? filled++ : k - 1;  // the k-th falls out when full
    std::copy_backward(best + lo, best + last, best + last + 1);
    best[lo] = c;
  }
};

// Offers {scores[i], id_of(i), pos0 + i} for i < n to `buf`. Candidates below the current k-th score are
// rejected without the full comparison, 8 at a time with AVX2 (float): the result is the same as
// offering every candidate (ties and NaNs included), i.e. the k best under ranks_before.
template <typename T, typename IdFn>
inline void scan_top(const T* scores, int64_t n, TopBuffer<T>& buf, IdFn id_of, int64_t pos0 = 0) {
  int64_t i = 0;
#if defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {
    for (; i + 8 <= n; i += 8) {
      if (!buf.full_and_finite()) {
        for (int64_t j = i; j < i + 8; ++j) buf.offer({scores[j], id_of(j), pos0 + j});
        continue;
      }
      // score >= threshold (ordered compare: NaN fails, and NaN ranks after every kept candidate).
      const __m256 v = _mm256_loadu_ps(scores + i);
      unsigned mask = unsigned(_mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(buf.threshold()), _CMP_GE_OQ)));
      while (mask != 0) {
        const int64_t j = i + __builtin_ctz(mask);
        mask &= mask - 1;
        buf.offer({scores[j], id_of(j), pos0 + j});  // the full comparison (the threshold may have risen)
      }
    }
  }
#endif
  for (; i < n; ++i) {
    if (buf.full_and_finite() && !(scores[i] >= buf.threshold())) continue;
    buf.offer({scores[i], id_of(i), pos0 + i});
  }
}

}  // namespace ultramem::kernels
