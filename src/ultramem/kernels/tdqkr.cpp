// TDQKR kernels. This file is compiled once per ISA (UM_ISA = generic | avx2); the scalar references
// and shape checks are compiled in the generic build only. See tdqkr.h for the contracts.
#include "ultramem/kernels/tdqkr.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "ultramem/kernels/kernel_table.h"
#include "ultramem/kernels/simd.h"
#include "ultramem/kernels/topk.h"

namespace ultramem::kernels {
namespace UM_ISA {
namespace {

constexpr int64_t kCoreChunk = 64;  // tokens per partial dcores buffer (fixes the summation order)

// Per-thread scratch for one (token, head).
template <typename T>
struct Scratch {
  std::vector<T> f_row, f_col;      // [n] filter scores (rank-R filter: sum_k F_k^2)
  std::vector<T> fk;                // [n] one rank-R filter score F_k
  std::vector<Ranked<T>> cand;      // [n] or [m_first^2] ranking candidates
  std::vector<Ranked<T>> work;      // survivors of select_top_k
  std::vector<int32_t> irow, icol;  // [m_first] kept rows / cols
  std::vector<T> A;                 // [r, m_first]  A[b, x] = sum_a Csum[a,b] R[a,x]
  std::vector<T> Cc;                // [r, m_first]  s_col[b, icol[y]]
  std::vector<T> R;                 // [r, m_first]  s_row[a, irow[x]]
  std::vector<T> G;                 // [m_first, m_first] summed scores
  std::vector<T> neg;               // [n] negated filter scores of the rows not kept (two-sign filter)
  std::vector<int32_t> neg_id;      // [n] their rows
  std::vector<uint8_t> taken;       // [n] 1 for the rows kept from the positive end
  void reserve(const TdqkrShape& s) {
    f_row.resize(s.n);
    f_col.resize(s.n);
    if (s.filter_rank > 0) fk.resize(s.n);
    cand.reserve(std::max(s.n, s.m_first * s.m_first));
    irow.resize(s.m_first);
    icol.resize(s.m_first);
    A.resize(s.r * s.m_first);
    Cc.resize(s.r * s.m_first);
    R.resize(s.r * s.m_first);
    G.resize(s.m_first * s.m_first);
    if (s.m_neg > 0) {
      neg.resize(s.n);
      neg_id.resize(s.n);
      taken.assign(s.n, 0);
    }
  }
};

// The k best of scores[0, n) (ids id_of(i)) into out, best first.
template <typename T, typename IdFn>
void top_ids(const T* scores, int64_t n, int64_t k, IdFn id_of, Scratch<T>& sc, int32_t* out) {
  if (k <= 64) {
    Ranked<T> best[64];
    select_top_k(scores, n, k, id_of, 0, sc.work, best);
    for (int64_t x = 0; x < k; ++x) out[x] = static_cast<int32_t>(best[x].id);
    return;
  }
  sc.cand.resize(n);
  for (int64_t i = 0; i < n; ++i) sc.cand[i] = {scores[i], id_of(i), i};
  select_top(sc.cand, k);
  for (int64_t x = 0; x < k; ++x) out[x] = static_cast<int32_t>(sc.cand[x].id);
}

// First-stage candidates of one side from f = sum_a w[a] * S[a, :], S: [r, n]: the top m_pos, then
// (two-sign filter) the m_neg most negative of the other rows. Rank-R filter (w: [R, r]): the top
// m_first of sum_k F_k^2, F_k = sum_a w[k, a] * S[a, :].
template <typename T>
void filter_side(const TdqkrShape& s, const T* S, const T* w, Scratch<T>& sc, std::vector<T>& f,
                 int32_t* out) {
  const int64_t n = s.n, mp = s.m_pos();
  std::fill(f.begin(), f.end(), T(0));
  if (s.filter_rank > 0) {
    T* fk = sc.fk.data();
    for (int64_t k = 0; k < s.filter_rank; ++k) {
      std::fill(fk, fk + n, T(0));
      for (int64_t a = 0; a < s.r; ++a) simd::axpy(fk, w[k * s.r + a], S + a * n, n);
      for (int64_t i = 0; i < n; ++i) f[i] += fk[i] * fk[i];
    }
    top_ids(f.data(), n, s.m_first, [](int64_t i) { return i; }, sc, out);
    return;
  }
  for (int64_t a = 0; a < s.r; ++a) simd::axpy(f.data(), w[a], S + a * n, n);
  top_ids(f.data(), n, mp, [](int64_t i) { return i; }, sc, out);
  if (s.m_neg == 0) return;
  for (int64_t x = 0; x < mp; ++x) sc.taken[out[x]] = 1;
  int64_t rest = 0;
  for (int64_t i = 0; i < n; ++i)
    if (!sc.taken[i]) {
      sc.neg[rest] = -f[i];
      sc.neg_id[rest++] = static_cast<int32_t>(i);
    }
  for (int64_t x = 0; x < mp; ++x) sc.taken[out[x]] = 0;
  top_ids(sc.neg.data(), rest, s.m_neg, [&](int64_t k) { return int64_t(sc.neg_id[k]); }, sc, out + mp);
}

// Exact rescoring of one (token, head). Sr, Sc: [r, n]; cores_h(c) at cores + (c*H + h)*r*r.
template <typename T>
void rescore_one(const TdqkrShape& s, int64_t h, const T* Sr, const T* Scol, const T* cores,
                 const int32_t* irow, const int32_t* icol, Scratch<T>& sc, T* scores, int64_t* index) {
  const int64_t r = s.r, n = s.n, m1 = s.m_first, rr = r * r, H = s.H;
  // Csum = sum_c core_c, for the ranking score.
  T csum[64];
  T* cs = rr <= 64 ? csum : nullptr;
  std::vector<T> cs_heap;
  if (!cs) { cs_heap.resize(rr); cs = cs_heap.data(); }
  for (int64_t e = 0; e < rr; ++e) cs[e] = T(0);
  for (int64_t c = 0; c < s.C; ++c) {
    const T* core = cores + (c * H + h) * rr;
    for (int64_t e = 0; e < rr; ++e) cs[e] += core[e];
  }
  for (int64_t a = 0; a < r; ++a) {
    for (int64_t x = 0; x < m1; ++x) sc.R[a * m1 + x] = Sr[a * n + irow[x]];
    for (int64_t y = 0; y < m1; ++y) sc.Cc[a * m1 + y] = Scol[a * n + icol[y]];
  }
  // A[b, x] = sum_a Csum[a, b] * R[a, x]
  std::fill(sc.A.begin(), sc.A.end(), T(0));
  for (int64_t b = 0; b < r; ++b)
    for (int64_t a = 0; a < r; ++a) simd::axpy(&sc.A[b * m1], cs[a * r + b], &sc.R[a * m1], m1);
  // G[x, y] = sum_b A[b, x] * Cc[b, y] over the rescored pairs: all of them, or (two-sign filter) the
  // same-sign blocks, columns [y0(x), y1(x)) of row x.
  const int64_t mp = s.m_pos();
  auto y0 = [&](int64_t x) { return s.m_neg == 0 || x < mp ? int64_t(0) : mp; };
  auto y1 = [&](int64_t x) { return s.m_neg == 0 || x >= mp ? m1 : mp; };
  std::fill(sc.G.begin(), sc.G.end(), T(0));
  for (int64_t x = 0; x < m1; ++x)
    for (int64_t b = 0; b < r; ++b)
      simd::axpy(&sc.G[x * m1 + y0(x)], sc.A[b * m1 + x], &sc.Cc[b * m1 + y0(x)], y1(x) - y0(x));
  if (s.m <= 64) {
    // Scan G directly (ids computed only for the candidates that pass the threshold).
    TopBuffer<T> buf(s.m);
    if (s.m_neg == 0) {
      select_top_k(sc.G.data(), m1 * m1, s.m, [&](int64_t p) { return int64_t(irow[p / m1]) * n + icol[p % m1]; }, 0,
                   sc.work, buf.best);
      buf.filled = s.m;
    } else {
      for (int64_t x = 0; x < m1; ++x) {
        const int64_t a0 = y0(x);
        scan_top(&sc.G[x * m1 + a0], y1(x) - a0, buf, [&](int64_t y) { return int64_t(irow[x]) * n + icol[a0 + y]; },
                 x * m1 + a0);
      }
    }
    sc.cand.assign(buf.best, buf.best + s.m);
  } else {
    sc.cand.clear();
    for (int64_t x = 0; x < m1; ++x)
      for (int64_t y = y0(x); y < y1(x); ++y)
        sc.cand.push_back({sc.G[x * m1 + y], int64_t(irow[x]) * n + icol[y], x * m1 + y});
    select_top(sc.cand, s.m);
  }
  for (int64_t k = 0; k < s.m; ++k) {
    const int64_t x = sc.cand[k].pos / m1, y = sc.cand[k].pos % m1;
    index[k] = sc.cand[k].id;
    for (int64_t c = 0; c < s.C; ++c) {
      const T* core = cores + (c * H + h) * rr;
      T g = 0;
      for (int64_t a = 0; a < r; ++a) {
        T t = 0;
        for (int64_t b = 0; b < r; ++b) t += core[a * r + b] * sc.Cc[b * m1 + y];
        g += sc.R[a * m1 + x] * t;
      }
      scores[k * s.C + c] = g;
    }
  }
}

template <typename T>
void filter(const TdqkrShape& s, const T* s_row, const T* s_col, const T* u, const T* v,
            int32_t* idx_row, int32_t* idx_col) {
  const int64_t TH = s.T * s.H, rn = s.r * s.n, uv = s.filter_vectors() * s.r;
#pragma omp parallel if (s.T > 1)
  {
    Scratch<T> sc;
    sc.reserve(s);
#pragma omp for schedule(static)
    for (int64_t th = 0; th < TH; ++th) {
      const int64_t h = th % s.H;
      filter_side(s, s_row + th * rn, u + h * uv, sc, sc.f_row, idx_row + th * s.m_first);
      filter_side(s, s_col + th * rn, v + h * uv, sc, sc.f_col, idx_col + th * s.m_first);
    }
  }
}

template <typename T>
void rescore(const TdqkrShape& s, const T* s_row, const T* s_col, const T* cores,
             const int32_t* idx_row, const int32_t* idx_col, T* scores, int64_t* index) {
  const int64_t TH = s.T * s.H, rn = s.r * s.n;
#pragma omp parallel if (s.T > 1)
  {
    Scratch<T> sc;
    sc.reserve(s);
#pragma omp for schedule(static)
    for (int64_t th = 0; th < TH; ++th) {
      const int64_t h = th % s.H;
      rescore_one(s, h, s_row + th * rn, s_col + th * rn, cores, idx_row + th * s.m_first,
                  idx_col + th * s.m_first, sc, scores + th * s.m * s.C, index + th * s.m);
    }
  }
}

template <typename T>
void forward(const TdqkrShape& s, const T* s_row, const T* s_col, const T* cores, const T* u,
             const T* v, T* scores, int64_t* index) {
  const int64_t TH = s.T * s.H, rn = s.r * s.n, uv = s.filter_vectors() * s.r;
#pragma omp parallel if (s.T > 1)
  {
    Scratch<T> sc;
    sc.reserve(s);
#pragma omp for schedule(static)
    for (int64_t th = 0; th < TH; ++th) {
      const int64_t h = th % s.H;
      filter_side(s, s_row + th * rn, u + h * uv, sc, sc.f_row, sc.irow.data());
      filter_side(s, s_col + th * rn, v + h * uv, sc, sc.f_col, sc.icol.data());
      rescore_one(s, h, s_row + th * rn, s_col + th * rn, cores, sc.irow.data(), sc.icol.data(), sc,
                  scores + th * s.m * s.C, index + th * s.m);
    }
  }
}

template <typename T>
void backward(const TdqkrShape& s, const T* s_row, const T* s_col, const T* cores,
              const int64_t* index, const T* dscores, T* ds_row, T* ds_col, T* dcores) {
  const int64_t H = s.H, r = s.r, n = s.n, C = s.C, m = s.m, rr = r * r, rn = r * n;
  const int64_t core_numel = C * H * rr;
  const int64_t nchunks = (s.T + kCoreChunk - 1) / kCoreChunk;
  std::vector<T> partial(std::max<int64_t>(nchunks, 1) * core_numel, T(0));
#pragma omp parallel if (nchunks > 1)
  {
    std::vector<T> W(rr);
#pragma omp for schedule(static)
    for (int64_t chunk = 0; chunk < nchunks; ++chunk) {
      T* dc = partial.data() + chunk * core_numel;
      const int64_t t_end = std::min(s.T, (chunk + 1) * kCoreChunk);
      for (int64_t t = chunk * kCoreChunk; t < t_end; ++t) {
        for (int64_t h = 0; h < H; ++h) {
          const int64_t th = t * H + h;
          const T* Sr = s_row + th * rn;
          const T* Sc = s_col + th * rn;
          T* dSr = ds_row + th * rn;
          T* dSc = ds_col + th * rn;
          std::memset(dSr, 0, sizeof(T) * rn);
          std::memset(dSc, 0, sizeof(T) * rn);
          for (int64_t k = 0; k < m; ++k) {
            const int64_t g = index[th * m + k];
            const int64_t i = g / n, j = g % n;
            const T* dG = dscores + (th * m + k) * C;
            // W = sum_c dG_c * core_c
            for (int64_t e = 0; e < rr; ++e) W[e] = T(0);
            for (int64_t c = 0; c < C; ++c) {
              const T* core = cores + (c * H + h) * rr;
              for (int64_t e = 0; e < rr; ++e) W[e] += dG[c] * core[e];
              T* dcore = dc + (c * H + h) * rr;
              for (int64_t a = 0; a < r; ++a)
                for (int64_t b = 0; b < r; ++b) dcore[a * r + b] += dG[c] * (Sr[a * n + i] * Sc[b * n + j]);
            }
            for (int64_t a = 0; a < r; ++a) {
              T acc_row = 0;
              for (int64_t b = 0; b < r; ++b) acc_row += W[a * r + b] * Sc[b * n + j];
              dSr[a * n + i] += acc_row;
            }
            for (int64_t b = 0; b < r; ++b) {
              T acc_col = 0;
              for (int64_t a = 0; a < r; ++a) acc_col += Sr[a * n + i] * W[a * r + b];
              dSc[b * n + j] += acc_col;
            }
          }
        }
      }
    }
  }
  std::fill(dcores, dcores + core_numel, T(0));
  for (int64_t chunk = 0; chunk < nchunks; ++chunk)
    for (int64_t e = 0; e < core_numel; ++e) dcores[e] += partial[chunk * core_numel + e];
}

// Top-m over the whole grid, one (token, head) at a time: row i of the summed scores is
// G[i, :] = sum_b A[b, i] S_col[b, :] with A = Csum^T S_row (the association order of rescore_one and of
// the references), scanned against the running m-th best.
template <typename T>
void exact(const TdqkrShape& s, const T* s_row, const T* s_col, const T* cores, T* scores, int64_t* index) {
  const int64_t TH = s.T * s.H, r = s.r, n = s.n, rr = r * r, rn = r * n, H = s.H;
#pragma omp parallel if (s.T > 1)
  {
    std::vector<T> A(rn), g(n), cs(rr);
    std::vector<Ranked<T>> cand;
#pragma omp for schedule(static)
    for (int64_t th = 0; th < TH; ++th) {
      const int64_t h = th % H;
      const T* Sr = s_row + th * rn;
      const T* Sc = s_col + th * rn;
      std::fill(cs.begin(), cs.end(), T(0));
      for (int64_t c = 0; c < s.C; ++c)
        for (int64_t e = 0; e < rr; ++e) cs[e] += cores[(c * H + h) * rr + e];
      std::fill(A.begin(), A.end(), T(0));
      for (int64_t b = 0; b < r; ++b)
        for (int64_t a = 0; a < r; ++a) simd::axpy(&A[b * n], cs[a * r + b], Sr + a * n, n);
      auto row = [&](int64_t i) {
        std::fill(g.begin(), g.end(), T(0));
        for (int64_t b = 0; b < r; ++b) simd::axpy(g.data(), A[b * n + i], Sc + b * n, n);
      };
      if (s.m <= 64) {
        TopBuffer<T> buf(s.m);
        for (int64_t i = 0; i < n; ++i) {
          row(i);
          scan_top(g.data(), n, buf, [&](int64_t j) { return i * n + j; }, i * n);
        }
        cand.assign(buf.best, buf.best + s.m);
      } else {
        cand.clear();
        for (int64_t i = 0; i < n; ++i) {
          row(i);
          for (int64_t j = 0; j < n; ++j) cand.push_back({g[j], i * n + j, i * n + j});
        }
        select_top(cand, s.m);
      }
      for (int64_t k = 0; k < s.m; ++k) {
        const int64_t i = cand[k].id / n, j = cand[k].id % n;
        index[th * s.m + k] = cand[k].id;
        for (int64_t c = 0; c < s.C; ++c) {
          const T* core = cores + (c * H + h) * rr;
          T v = 0;
          for (int64_t a = 0; a < r; ++a) {
            T t = 0;
            for (int64_t b = 0; b < r; ++b) t += core[a * r + b] * Sc[b * n + j];
            v += Sr[a * n + i] * t;
          }
          scores[(th * s.m + k) * s.C + c] = v;
        }
      }
    }
  }
}

}  // namespace

template <typename T>
void fill_tdqkr(KernelTable<T>& t) {
  t.tdqkr_filter = &filter<T>;
  t.tdqkr_rescore = &rescore<T>;
  t.tdqkr_forward = &forward<T>;
  t.tdqkr_backward = &backward<T>;
  t.tdqkr_exact = &exact<T>;
}
template void fill_tdqkr<float>(KernelTable<float>&);
template void fill_tdqkr<double>(KernelTable<double>&);

}  // namespace UM_ISA

#if UM_ISA_GENERIC
// ---- shape check and scalar references (generic build only) -----------------------------------

const char* tdqkr_check_shape(const TdqkrShape& s) {
  if (s.T < 0) return "T (tokens) must be >= 0";
  if (s.H < 1) return "H (heads) must be >= 1";
  if (s.r < 1) return "r (Tucker rank) must be >= 1";
  if (s.n < 1) return "n (keys per side) must be >= 1";
  if (s.n > (int64_t(1) << 30)) return "n (keys per side) must be < 2^30";
  if (s.C < 1) return "C (cores) must be >= 1";
  if (s.m_first < 1 || s.m_first > s.n) return "m_first must be in [1, n]";
  if (s.m_neg < 0 || s.m_neg >= s.m_first) return "m_neg (two-sign filter) must be in [0, m_first - 1]";
  if (s.filter_rank < 0 || s.filter_rank > s.r) return "filter_rank (rank-R filter) must be in [0, r] (0: rank-1 filter)";
  if (s.filter_rank > 0 && s.m_neg != 0) return "m_neg (two-sign filter) must be 0 with the rank-R filter (filter_rank > 0)";
  if (s.m_neg == 0 && (s.m < 1 || s.m > s.m_first * s.m_first)) return "m must be in [1, m_first*m_first]";
  if (s.m_neg > 0 && (s.m < 1 || s.m > s.rescored_pairs()))
    return "m must be in [1, m_pos^2 + m_neg^2] (two-sign filter, m_pos = m_first - m_neg)";
  return nullptr;
}

namespace {
// Scalar helpers for the references: direct formulas, no reuse of the kernel code paths.
template <typename T>
T core_score(const TdqkrShape& s, const T* Sr, const T* Sc, const T* core, int64_t i, int64_t j) {
  T g = 0;
  for (int64_t a = 0; a < s.r; ++a) {
    T t = 0;
    for (int64_t b = 0; b < s.r; ++b) t += core[a * s.r + b] * Sc[b * s.n + j];
    g += Sr[a * s.n + i] * t;
  }
  return g;
}
// The ranking score, summed cores, in the kernel's association order (A = Csum^T R, then <A, Cc>).
template <typename T>
T summed_score(const TdqkrShape& s, const T* Sr, const T* Sc, const T* csum, int64_t i, int64_t j) {
  T g = 0;
  for (int64_t b = 0; b < s.r; ++b) {
    T A = 0;
    for (int64_t a = 0; a < s.r; ++a) A += csum[a * s.r + b] * Sr[a * s.n + i];
    g += A * Sc[b * s.n + j];
  }
  return g;
}
template <typename T>
std::vector<T> core_sum(const TdqkrShape& s, const T* cores, int64_t h) {
  std::vector<T> cs(s.r * s.r, T(0));
  for (int64_t c = 0; c < s.C; ++c)
    for (int64_t e = 0; e < s.r * s.r; ++e) cs[e] += cores[(c * s.H + h) * s.r * s.r + e];
  return cs;
}
template <typename T>
void emit_kept(const TdqkrShape& s, const T* Sr, const T* Sc, const T* cores, int64_t h,
               std::vector<Ranked<T>>& cand, T* scores, int64_t* index) {
  std::sort(cand.begin(), cand.end(), ranks_before<T>);
  for (int64_t k = 0; k < s.m; ++k) {
    const int64_t g = cand[k].id;
    index[k] = g;
    for (int64_t c = 0; c < s.C; ++c)
      scores[k * s.C + c] = core_score(s, Sr, Sc, cores + (c * s.H + h) * s.r * s.r, g / s.n, g % s.n);
  }
}
}  // namespace

template <typename T>
void tdqkr_filter_ref(const TdqkrShape& s, const T* s_row, const T* s_col, const T* u, const T* v,
                      int32_t* idx_row, int32_t* idx_col) {
  const int64_t rn = s.r * s.n;
  for (int64_t th = 0; th < s.T * s.H; ++th) {
    const int64_t h = th % s.H;
    for (int side = 0; side < 2; ++side) {
      const T* S = (side == 0 ? s_row : s_col) + th * rn;
      const T* w = (side == 0 ? u : v) + h * s.r * s.filter_vectors();
      std::vector<Ranked<T>> cand;
      for (int64_t i = 0; i < s.n; ++i) {
        T f = 0;
        if (s.filter_rank == 0) {
          for (int64_t a = 0; a < s.r; ++a) f += w[a] * S[a * s.n + i];
        } else {  // rank-R filter: the squared norm of the R filter scores
          for (int64_t k = 0; k < s.filter_rank; ++k) {
            T fk = 0;
            for (int64_t a = 0; a < s.r; ++a) fk += w[k * s.r + a] * S[a * s.n + i];
            f += fk * fk;
          }
        }
        cand.push_back({f, i, 0});
      }
      std::sort(cand.begin(), cand.end(), ranks_before<T>);
      int32_t* out = (side == 0 ? idx_row : idx_col) + th * s.m_first;
      const int64_t mp = s.m_pos();
      for (int64_t x = 0; x < mp; ++x) out[x] = static_cast<int32_t>(cand[x].id);
      // Two-sign filter: the rest ranked by the negated score.
      std::vector<Ranked<T>> rest;
      for (size_t x = mp; x < cand.size(); ++x) rest.push_back({-cand[x].score, cand[x].id, 0});
      std::sort(rest.begin(), rest.end(), ranks_before<T>);
      for (int64_t x = 0; x < s.m_neg; ++x) out[mp + x] = static_cast<int32_t>(rest[x].id);
    }
  }
}

template <typename T>
void tdqkr_rescore_ref(const TdqkrShape& s, const T* s_row, const T* s_col, const T* cores,
                       const int32_t* idx_row, const int32_t* idx_col, T* scores, int64_t* index) {
  const int64_t rn = s.r * s.n;
  for (int64_t th = 0; th < s.T * s.H; ++th) {
    const int64_t h = th % s.H;
    const T* Sr = s_row + th * rn;
    const T* Sc = s_col + th * rn;
    const std::vector<T> cs = core_sum(s, cores, h);
    std::vector<Ranked<T>> cand;
    const int64_t mp = s.m_pos();
    for (int64_t x = 0; x < s.m_first; ++x)
      for (int64_t y = 0; y < s.m_first; ++y) {
        if (s.m_neg > 0 && (x < mp) != (y < mp)) continue;  // two-sign filter: same-sign blocks only
        const int64_t i = idx_row[th * s.m_first + x], j = idx_col[th * s.m_first + y];
        cand.push_back({summed_score(s, Sr, Sc, cs.data(), i, j), i * s.n + j, 0});
      }
    emit_kept(s, Sr, Sc, cores, h, cand, scores + th * s.m * s.C, index + th * s.m);
  }
}

template <typename T>
void tdqkr_bruteforce_ref(const TdqkrShape& s, const T* s_row, const T* s_col, const T* cores,
                          T* scores, int64_t* index) {
  const int64_t rn = s.r * s.n;
  for (int64_t th = 0; th < s.T * s.H; ++th) {
    const int64_t h = th % s.H;
    const T* Sr = s_row + th * rn;
    const T* Sc = s_col + th * rn;
    const std::vector<T> cs = core_sum(s, cores, h);
    std::vector<Ranked<T>> cand;
    for (int64_t i = 0; i < s.n; ++i)
      for (int64_t j = 0; j < s.n; ++j)
        cand.push_back({summed_score(s, Sr, Sc, cs.data(), i, j), i * s.n + j, 0});
    emit_kept(s, Sr, Sc, cores, h, cand, scores + th * s.m * s.C, index + th * s.m);
  }
}

template <typename T>
void tdqkr_backward_ref(const TdqkrShape& s, const T* s_row, const T* s_col, const T* cores,
                        const int64_t* index, const T* dscores, T* ds_row, T* ds_col, T* dcores) {
  const int64_t r = s.r, n = s.n, H = s.H, rr = r * r, rn = r * n;
  std::fill(ds_row, ds_row + s.T * H * rn, T(0));
  std::fill(ds_col, ds_col + s.T * H * rn, T(0));
  std::fill(dcores, dcores + s.C * H * rr, T(0));
  for (int64_t th = 0; th < s.T * H; ++th) {
    const int64_t h = th % H;
    for (int64_t k = 0; k < s.m; ++k) {
      const int64_t g = index[th * s.m + k], i = g / n, j = g % n;
      for (int64_t c = 0; c < s.C; ++c) {
        const T dG = dscores[(th * s.m + k) * s.C + c];
        const T* core = cores + (c * H + h) * rr;
        for (int64_t a = 0; a < r; ++a)
          for (int64_t b = 0; b < r; ++b) {
            const T srow = s_row[th * rn + a * n + i], scol = s_col[th * rn + b * n + j];
            ds_row[th * rn + a * n + i] += dG * core[a * r + b] * scol;
            ds_col[th * rn + b * n + j] += dG * core[a * r + b] * srow;
            dcores[(c * H + h) * rr + a * r + b] += dG * srow * scol;
          }
      }
    }
  }
}

#define UM_INSTANTIATE_TDQKR_REF(T)                                                                   \
  template void tdqkr_filter_ref<T>(const TdqkrShape&, const T*, const T*, const T*, const T*,        \
                                    int32_t*, int32_t*);                                              \
  template void tdqkr_rescore_ref<T>(const TdqkrShape&, const T*, const T*, const T*, const int32_t*, \
                                     const int32_t*, T*, int64_t*);                                   \
  template void tdqkr_bruteforce_ref<T>(const TdqkrShape&, const T*, const T*, const T*, T*,          \
                                        int64_t*);                                                    \
  template void tdqkr_backward_ref<T>(const TdqkrShape&, const T*, const T*, const T*,                \
                                      const int64_t*, const T*, T*, T*, T*);
UM_INSTANTIATE_TDQKR_REF(float)
UM_INSTANTIATE_TDQKR_REF(double)
#endif  // UM_ISA_GENERIC

}  // namespace ultramem::kernels
