// Private to the kernels folder: deterministic top-k selection under the ordering contract of
// tdqkr.h (score descending, ties by smaller id, NaN last).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
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

// The k best of {scores[i], id_of(i), pos0 + i}, i < n, sorted best first into out[0, k), exactly as
// scan_top would find them, in three passes:
//  1. the maxima of G interleaved groups (group l holds the scores i with i mod G == l; G = 64 or 128,
//     G >= k) and t0 = the k-th largest of them: k distinct scores are >= t0, so every one of the k best
//     is >= t0;
//  2. the survivors >= t0 collected (about 1.5k of n = 32k random scores; NaN fails the compare);
//  3. exact selection among the survivors (score descending, ties by smaller id; no NaN is left).
// Falls back to scan_top when fewer than k groups have a finite maximum or n < max(8k, 128).
// `work` is scratch.
template <typename T, typename IdFn>
inline void select_top_k(const T* scores, int64_t n, int64_t k, IdFn id_of, int64_t pos0,
                         std::vector<Ranked<T>>& work, Ranked<T>* out) {
  auto fallback = [&] {
    TopBuffer<T> buf(k);
    scan_top(scores, n, buf, id_of, pos0);
    std::copy(buf.best, buf.best + k, out);
  };
  if (k < 1) return;
  if (k > 64 || n < 8 * k || n < 128) return fallback();
  const int64_t G = n >= 512 ? 128 : 64;
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  T gmax[128];
  std::fill(gmax, gmax + G, kNegInf);
  int64_t i = 0;
#if defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {
    __m256 acc[16];
    for (int64_t v = 0; v < G / 8; ++v) acc[v] = _mm256_set1_ps(kNegInf);
    for (; i + G <= n; i += G)
      for (int64_t v = 0; v < G / 8; ++v)
        acc[v] = _mm256_max_ps(_mm256_loadu_ps(scores + i + 8 * v), acc[v]);  // a NaN load keeps acc
    for (int64_t v = 0; v < G / 8; ++v) _mm256_storeu_ps(gmax + 8 * v, acc[v]);
  }
#endif
  for (; i < n; ++i) {
    T& g = gmax[i % G];
    g = scores[i] > g ? scores[i] : g;
  }
  std::nth_element(gmax, gmax + (k - 1), gmax + G, [](T a, T b) { return a > b; });
  const T t0 = gmax[k - 1];
  if (!(t0 > kNegInf)) return fallback();
  work.clear();
  i = 0;
#if defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {
    const __m256 tv = _mm256_set1_ps(t0);
    for (; i + 8 <= n; i += 8) {
      unsigned mask = unsigned(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(scores + i), tv, _CMP_GE_OQ)));
      while (mask != 0) {
        const int64_t j = i + __builtin_ctz(mask);
        mask &= mask - 1;
        work.push_back({scores[j], id_of(j), pos0 + j});
      }
    }
  }
#endif
  for (; i < n; ++i)
    if (scores[i] >= t0) work.push_back({scores[i], id_of(i), pos0 + i});
  // No NaN among the survivors: the plain order (ranks_before without its NaN branches).
  const auto before = [](const Ranked<T>& a, const Ranked<T>& b) {
    return a.score > b.score || (a.score == b.score && a.id < b.id);
  };
  // At least k survivors by construction (k groups have a maximum >= t0); were that ever broken, the
  // exact scan keeps the result right instead of sorting past the end.
  if (int64_t(work.size()) < k) return fallback();
  if (int64_t(work.size()) > k) std::nth_element(work.begin(), work.begin() + k, work.end(), before);
  std::sort(work.begin(), work.begin() + k, before);
  std::copy(work.begin(), work.begin() + k, out);
}

}  // namespace ultramem::kernels
