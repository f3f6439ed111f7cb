#include "ultramem/nn/memory_config.h"

#include "ultramem/ops/engram_rows.h"

#include <stdexcept>
#include <string>

namespace ultramem::nn {
namespace {

[[noreturn]] void fail(const std::string& who, const std::string& field, const std::string& why) {
  throw std::invalid_argument(who + "." + field + ": " + why);
}

void require_positive(const std::string& who, const std::string& field, int64_t v) {
  if (v < 1) fail(who, field, "must be >= 1, got " + std::to_string(v));
}

void require_at_most(const std::string& who, const std::string& field, int64_t v, int64_t limit) {
  if (v > limit) fail(who, field, "must be <= " + std::to_string(limit) + ", got " + std::to_string(v));
}

}  // namespace

NormKind parse_norm_kind(const std::string& s) {
  if (s == "rms") return NormKind::RMS;
  if (s == "layer") return NormKind::Layer;
  throw std::invalid_argument("qk_norm: expected \"rms\" or \"layer\", got \"" + s + "\"");
}

ValueInit parse_value_init(const std::string& s) {
  if (s == "paper") return ValueInit::Paper;
  if (s == "fixed") return ValueInit::Fixed;
  if (s == "v2") return ValueInit::V2;
  throw std::invalid_argument("value_init: expected \"paper\", \"fixed\" or \"v2\", got \"" + s + "\"");
}

const char* to_string(NormKind k) { return k == NormKind::RMS ? "rms" : "layer"; }
const char* to_string(ValueInit v) {
  return v == ValueInit::Paper ? "paper" : v == ValueInit::Fixed ? "fixed" : "v2";
}

ValueFormat parse_value_format(const std::string& s) {
  if (s == "fp32" || s == "float32") return ValueFormat::kFloat32;
  if (s == "bf16" || s == "bfloat16") return ValueFormat::kBFloat16;
  if (s == "int8") return ValueFormat::kInt8;
  throw std::invalid_argument("value format: expected \"fp32\", \"bf16\" or \"int8\", got \"" + s + "\"");
}

const char* to_string(ValueFormat f) {
  switch (f) {
    case ValueFormat::kFloat32: return "fp32";
    case ValueFormat::kBFloat16: return "bf16";
    case ValueFormat::kInt8: return "int8";
  }
  return "?";
}

RetrievalFilter parse_retrieval_filter(const std::string& s) {
  if (s == "rank1") return RetrievalFilter::kRank1;
  if (s == "two_sign") return RetrievalFilter::kTwoSign;
  if (s == "rank_r") return RetrievalFilter::kRankR;
  throw std::invalid_argument("filter: expected \"rank1\" (the paper's), \"two_sign\" or \"rank_r\", got \"" + s + "\"");
}

const char* to_string(RetrievalFilter f) {
  switch (f) {
    case RetrievalFilter::kRank1: return "rank1";
    case RetrievalFilter::kTwoSign: return "two_sign";
    case RetrievalFilter::kRankR: return "rank_r";
  }
  return "?";
}

AuxReduction parse_aux_reduction(const std::string& s) {
  if (s == "mean") return AuxReduction::kMean;
  if (s == "sum") return AuxReduction::kSum;
  throw std::invalid_argument("aux_reduction: expected \"mean\" (over heads, the authors' formula) or \"sum\", got \"" + s +
                              "\"");
}

const char* to_string(AuxReduction r) { return r == AuxReduction::kMean ? "mean" : "sum"; }

UltraMemConfig UltraMemConfig::v2_defaults() {
  UltraMemConfig c;
  c.query_per_rank = true;
  c.single_projection = true;
  c.Dp = c.Dv / 3;  // the paper's Dp : Dv = 1 : 3
  c.H = 1;          // one head with doubled Dk and m beats two (spec section 11)
  c.Dk = 128;
  c.m = 32;
  c.m_first = 32;
  c.aux_loss = false;
  c.value_init = ValueInit::V2;
  return c;
}

int64_t UltraMemConfig::sqrt_E() const {
  int64_t s = 0;
  while ((s + 1) * (s + 1) <= E) ++s;
  return s;
}

void UltraMemConfig::validate() const {
  const std::string who = "UltraMemConfig";
  require_positive(who, "D", D);
  require_positive(who, "n", n);
  require_positive(who, "E", E);
  require_positive(who, "Dk", Dk);
  require_positive(who, "Dv", Dv);
  require_positive(who, "r", r);
  require_positive(who, "C", C);
  require_positive(who, "H", H);
  require_positive(who, "m", m);
  require_positive(who, "num_layers", num_layers);
  require_positive(who, "stats_window", stats_window);
  // Upper bounds before anything loops over or multiplies these (sqrt_E() counts up to sqrt(E)).
  require_at_most(who, "n", n, 65536);
  require_at_most(who, "E", E, kMaxExpansion);
  require_at_most(who, "Dk", Dk, kMaxDim);
  require_at_most(who, "Dv", Dv, kMaxDim);
  require_at_most(who, "r", r, kMaxRank);
  require_at_most(who, "C", C, Dv);
  require_at_most(who, "H", H, kMaxHeads);
  require_at_most(who, "stats_window", stats_window, int64_t(1) << 30);
  if (sqrt_E() * sqrt_E() != E) fail(who, "E", "must be a square number (1, 4, 9, ...), got " + std::to_string(E));
  if (n % sqrt_E() != 0)
    fail(who, "n", "must be a multiple of sqrt(E) = " + std::to_string(sqrt_E()) +
                       " (n = sqrt(E) * n_phys), got " + std::to_string(n));
  if (Dv % C != 0)
    fail(who, "Dv", "must be divisible by C = " + std::to_string(C) + " (MCS slices), got " + std::to_string(Dv));
  if (m > n * n) fail(who, "m", "must be <= n*n = " + std::to_string(n * n) + ", got " + std::to_string(m));
  // TDQKR (spec section 4): the rank-1 filter keeps m1 = first_stage_m() rows and columns out of n, and
  // the final top-m is taken among the m1 x m1 rescored candidates, so 1 <= m1 <= n and m <= m1^2.
  // m1 may be smaller than m (the spec keeps the two separate).
  if (m_first < 0) fail(who, "m_first", "must be >= 0 (0 means m), got " + std::to_string(m_first));
  const int64_t m1 = first_stage_m();
  if (m1 > n) {
    if (m_first == 0)
      fail(who, "m_first", "is 0, which means m = " + std::to_string(m) + ", but the first stage keeps at most n = " +
                               std::to_string(n) + " per side; set m_first to a value in [ceil(sqrt(m)), n]");
    fail(who, "m_first", "must be <= n = " + std::to_string(n) + ", got " + std::to_string(m_first));
  }
  if (m1 * m1 < m)
    fail(who, "m_first", "must be >= ceil(sqrt(m)) so that its m_first x m_first candidates hold the m = " +
                             std::to_string(m) + " kept ones, got " + std::to_string(m1) + " (" +
                             std::to_string(m1 * m1) + " candidates)");
  if (m_neg < 0) fail(who, "m_neg", "must be >= 0 (0 means m_first / 2), got " + std::to_string(m_neg));
  if (filter != RetrievalFilter::kTwoSign && m_neg != 0)
    fail(who, "m_neg", std::string("only the two_sign filter takes m_neg (filter is ") + to_string(filter) + "), got " +
                           std::to_string(m_neg));
  if (filter != RetrievalFilter::kRankR && filter_rank != 0)
    fail(who, "filter_rank", std::string("only the rank_r filter takes filter_rank (filter is ") + to_string(filter) +
                                 "), got " + std::to_string(filter_rank));
  if (filter == RetrievalFilter::kRankR && (filter_rank < 0 || filter_rank > r))
    fail(who, "filter_rank", "must be in [1, r = " + std::to_string(r) + "] (0 means r), got " + std::to_string(filter_rank));
  if (filter == RetrievalFilter::kTwoSign) {
    if (m1 < 2) fail(who, "m_first", "the two_sign filter needs m_first >= 2 (one candidate from each end), got " + std::to_string(m1));
    const int64_t mn = filter_negatives(), mp = m1 - mn;
    if (mn >= m1)
      fail(who, "m_neg", "must be < m_first = " + std::to_string(m1) + " (the rest come from the positive end), got " +
                             std::to_string(mn));
    if (mp * mp + mn * mn < m)
      fail(who, "m_neg", "splits m_first = " + std::to_string(m1) + " into " + std::to_string(mp) + " + " +
                             std::to_string(mn) + ", whose same-sign blocks hold " + std::to_string(mp * mp + mn * mn) +
                             " pairs, fewer than m = " + std::to_string(m) + "; raise m_first or balance the split");
  }
  if (retrieval_sample < 0) fail(who, "retrieval_sample", "must be >= 0 (0 turns the check off)");
  if (qk_scale_init < 0) fail(who, "qk_scale_init", "must be >= 0 (0 means Dk^-0.33)");
  if (aux_alpha < 0) fail(who, "aux_alpha", "must be >= 0");
  if (value_init == ValueInit::Fixed && !(value_std > 0)) fail(who, "value_std", "must be > 0");
  if (Dp < 0) fail(who, "Dp", "must be >= 0 (0: no pre-values), got " + std::to_string(Dp));
  require_at_most(who, "Dp", Dp, kMaxDim);
  if (value_init == ValueInit::V2 && Dp == 0)
    fail(who, "value_init", "\"v2\" sizes values and pre-values together and needs Dp > 0");
  if (!(inner_ratio > 0) || !(score_var >= 0))
    fail(who, inner_ratio > 0 ? "score_var" : "inner_ratio", "must be > 0 (score_var >= 0)");
}

void PKMConfig::validate() const {
  const std::string who = "PKMConfig";
  require_positive(who, "D", D);
  require_positive(who, "n", n);
  require_positive(who, "Dk", Dk);
  require_positive(who, "Dv", Dv);
  require_positive(who, "H", H);
  require_positive(who, "m", m);
  require_at_most(who, "n", n, 65536);
  require_at_most(who, "Dk", Dk, UltraMemConfig::kMaxDim);
  require_at_most(who, "Dv", Dv, UltraMemConfig::kMaxDim);
  require_at_most(who, "H", H, UltraMemConfig::kMaxHeads);
  if (m > n) fail(who, "m", "must be <= n = " + std::to_string(n) + " (top-m per side), got " + std::to_string(m));
  if (value_std < 0) fail(who, "value_std", "must be >= 0 (0 means Dv^-0.5)");
}

std::vector<int64_t> EngramConfig::table_sizes() const { return ops::engram_hash(heads, rows, seed).sizes; }

void EngramConfig::validate() const {
  const std::string who = "EngramConfig";
  require_positive(who, "D", D);
  require_positive(who, "heads", heads);
  require_positive(who, "d_e", d_e);
  require_positive(who, "rows", rows);
  require_positive(who, "kernel", kernel);
  require_at_most(who, "heads", heads, 64);
  require_at_most(who, "d_e", d_e, UltraMemConfig::kMaxDim);
  require_at_most(who, "rows", rows, int64_t(1) << 31);
  require_at_most(who, "kernel", kernel, 64);
  if (d_e % (2 * heads) != 0)
    fail(who, "d_e", "must be a multiple of 2 * heads = " + std::to_string(2 * heads) + " (one slice per table), got " +
                         std::to_string(d_e));
  if (!(value_std > 0)) fail(who, "value_std", "must be > 0");
  if (!(conv_std >= 0)) fail(who, "conv_std", "must be >= 0 (0: the taps start at zero)");
}

}  // namespace ultramem::nn
