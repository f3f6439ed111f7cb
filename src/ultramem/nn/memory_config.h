// Configuration of the memory layers (UltraMem and the PKM baseline). Plain structs; validate()
// throws std::invalid_argument with a message naming the offending field.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace ultramem::nn {

enum class NormKind { RMS, Layer };
enum class ValueInit {
  Paper,  // values ~ N(0, E / (2 m H L)): memory-output variance about 1/(2L) (spec section 6)
  Fixed,  // values ~ N(0, value_std^2), as the authors' public code (0.02)
  V2      // UltraMemV2 (spec section 11): values and pre-values ~ N(0, sigma_V^2) with
          // sigma_V = (0.2 k_inner D / (m H (1 + sigma_s^2) Dp Dv L))^(1/4); wq, wp, wo ~ N(0, 2 / (5 D))
};

// Storage of an UltraMem value table. kFloat32 is trainable; kBFloat16 and kInt8 (symmetric, one
// float scale per row: value = q * scale, scale = max|row| / 127) are for inference only.
enum class ValueFormat { kFloat32, kBFloat16, kInt8 };

// TDQKR's first stage (docs/memory_layer.md). kRank1: the paper's filter, the m_first largest rank-1
// filter scores per side. kTwoSign: the m_first - m_neg largest and the m_neg most negative, with only
// the same-sign blocks rescored (the (-,-) quadrant of the grid scores as high as the (+,+) one).
// kRankR: R filter scores per side from the R leading singular pairs of the core sum, rows ranked by
// the norm of their R scores, every m_first x m_first pair rescored.
enum class RetrievalFilter { kRank1, kTwoSign, kRankR };

// How the Tucker aux loss combines the heads: kMean as the authors' formula (the default), kSum the
// earlier default of this code (H times larger).
enum class AuxReduction { kMean, kSum };

NormKind parse_norm_kind(const std::string& s);  // "rms" | "layer"
ValueInit parse_value_init(const std::string& s);  // "paper" | "fixed" | "v2"
const char* to_string(NormKind k);
const char* to_string(ValueInit v);
ValueFormat parse_value_format(const std::string& s);  // "fp32" | "float32" | "bf16" | "bfloat16" | "int8"
const char* to_string(ValueFormat f);                  // "fp32" | "bf16" | "int8"
RetrievalFilter parse_retrieval_filter(const std::string& s);  // "rank1" | "two_sign" | "rank_r"
const char* to_string(RetrievalFilter f);
AuxReduction parse_aux_reduction(const std::string& s);  // "mean" | "sum"
const char* to_string(AuxReduction r);

struct UltraMemConfig {
  int64_t D = 256;       // model width (input and output of the layer)
  int64_t n = 64;        // keys per side; the grid has n*n = E*N virtual slots
  int64_t E = 4;         // implicit value expansion factor, a square (1, 4, 9, 16, ...)
  int64_t Dk = 64;       // key dim per side
  int64_t Dv = 128;      // value dim (paper: D/2); divisible by C
  int64_t r = 2;         // Tucker rank
  int64_t C = 2;         // Tucker cores (multi-core scoring)
  int64_t H = 2;         // key sets ("heads"); all heads share one query
  int64_t m = 16;        // values kept per head
  int64_t m_first = 0;   // first-stage top-m per side; 0 means m. Valid: m_first <= n and m <= m_first^2
                         // (the final top-m is taken among m_first x m_first candidates; m_first < m is allowed)
  RetrievalFilter filter = RetrievalFilter::kRank1;  // first-stage filter; configs without the key are the paper's
  int64_t m_neg = 0;     // two_sign: of the m_first candidates per side, those from the negative end;
                         // 0 means m_first / 2. Must be 0 with rank1 and rank_r.
  int64_t filter_rank = 0;  // rank_r: R, the filter scores per side, in [1, r]; 0 means r. Must be 0 otherwise.
  NormKind qk_norm = NormKind::RMS;  // normalisation of query halves and keys over Dk
  double qk_scale_init = 0.0;        // initial norm scale for query and keys; 0 means Dk^-0.33
  bool aux_loss = true;              // Tucker core aux loss (V1); needs r >= 2 to have any effect
  double aux_alpha = 0.001;
  double aux_tau = 0.15;
  AuxReduction aux_reduction = AuxReduction::kMean;  // over heads (docs/memory_layer.md)
  ValueInit value_init = ValueInit::Paper;
  double value_std = 0.02;           // used with ValueInit::Fixed
  int64_t num_layers = 4;            // L of the transformer, for the paper's value init
  bool sparse_value_grad = false;    // value gradient as sparse COO (rows hit only) instead of dense
  bool track_stats = true;           // memory telemetry (coverage, KL, scores, output std)
  int64_t stats_window = 4096;       // tokens per telemetry window
  int64_t retrieval_sample = 64;     // tokens per window whose retrieval is checked against the exact
                                     // top-m over the whole grid (recall, score mass); 0 turns it off
  uint64_t seed = 0;                 // seeds weights and the IVE permutation
  // The IVE permutation: 0 shuffles [0, n*n) from the seed (stored with the weights); a nonzero key makes it
  // the keyed Feistel bijection of [0, n*n) (kernels/feistel.h), materialised into the stored permutation
  // for training and taking no memory where the table is a file (external_values). Saved as the key.
  uint64_t permutation_key = 0;
  // UltraMemV2 (spec section 11; the memory kind "ultramem_v2" starts from v2_defaults()). Each is a switch
  // of its own; the V1 defaults leave the layer as the paper's V1.
  bool query_per_rank = false;    // one query per Tucker rank: wq [D, 2*r*Dk], rank a scores with its own halves
  bool single_projection = false;  // IVE as one projection: the kept values of all E groups pooled together,
                                   // wo [Dv, D] (the grid keeps its E*N virtual slots)
  int64_t Dp = 0;                 // PEER-style pre-values [N, Dp] and wp [D, Dp]: a kept slot's value row is
                                  // weighted by <x wp, pre_values[row]> * score; 0: none
  double inner_ratio = 4.0;       // k_inner of the V2 value init: FFN inner width over D (the model sets it)
  double score_var = 0.1;         // sigma_s^2 of the V2 value init: variance of the kept scores
  // Not part of the JSON config: false leaves the value table and the permutation allocated but
  // unwritten (no memory is touched), for models whose weights are about to be loaded.
  bool init_values = true;
  // Not part of the JSON config either: true allocates no value table and no permutation (empty tensors),
  // for a table larger than memory served from a file (UltraMem::set_tiered_values with a Feistel key);
  // such a layer runs no-grad forwards only, and only with its tiered table installed.
  bool external_values = false;

  // The UltraMemV2 template: query per rank, one projection, pre-values of Dv / 3, the V2 init (query/key
  // norm scale Dk^-0.4), no aux loss, one head (spec section 11).
  static UltraMemConfig v2_defaults();
  // Any V2 change of the forward (query_per_rank, single_projection, Dp > 0): the layer then runs the
  // autograd ops under no-grad too (the fused inference op computes V1 only).
  bool v2_forward() const { return query_per_rank || single_projection || Dp > 0; }
  int64_t query_ranks() const { return query_per_rank ? r : 1; }   // query halves per side
  int64_t projection_groups() const { return single_projection ? 1 : E; }  // wo: [projection_groups*Dv, D]
  int64_t sqrt_E() const;                                   // integer square root of E
  int64_t physical_rows() const { return E > 0 ? n * n / E : 0; }  // N (0 for an invalid E < 1)
  int64_t first_stage_m() const { return m_first > 0 ? m_first : m; }
  // The kernels' m_neg (kernels::TdqkrShape): 0 for the paper's filter.
  int64_t filter_negatives() const {
    return filter != RetrievalFilter::kTwoSign ? 0 : (m_neg > 0 ? m_neg : first_stage_m() / 2);
  }
  // The kernels' filter_rank: R for rank_r, 0 for the signed rank-1 filters.
  int64_t filter_vectors() const {
    return filter != RetrievalFilter::kRankR ? 0 : (filter_rank > 0 ? filter_rank : r);
  }
  // Upper bounds of validate() (n <= 65536 besides): with them no size product overflows int64_t.
  static constexpr int64_t kMaxExpansion = int64_t(1) << 16;  // E
  static constexpr int64_t kMaxDim = int64_t(1) << 16;        // Dk, Dv
  static constexpr int64_t kMaxRank = 64;                     // r
  static constexpr int64_t kMaxHeads = 1024;                  // H
  void validate() const;
};

struct PKMConfig {
  int64_t D = 256;      // model width
  int64_t n = 64;       // keys per side; N = n*n value rows
  int64_t Dk = 64;      // key dim per side (half of the query of one head)
  int64_t Dv = 256;     // value dim; an output projection Dv -> D is added when Dv != D
  int64_t H = 4;        // heads, each with its own query
  int64_t m = 32;       // values kept per head (softmax over them)
  enum class QueryNorm { Batch, Layer, None } query_norm = QueryNorm::Batch;
  bool softmax = true;               // softmax over each head's m scores; false: the raw scores weight the values
  bool shared_query = false;         // one query [D, 2*Dk] shared by all heads (UltraMem's choice)
  double value_std = 0.0;            // 0 means Dv^-0.5 (as the PKM paper)
  bool sparse_value_grad = false;
  uint64_t seed = 0;

  void validate() const;
};

// Engram (spec section 12): a hashed n-gram memory read by token ids. For each order n in {2, 3} and each
// of `heads` hash heads the last n token ids are hashed into a table of prime size (the smallest prime
// >= rows, distinct per table); the 2*heads rows of width d_e / (2*heads) are concatenated (e [d_e]),
// projected to a key and a value ([D] each), the value gated by sigmoid(<RMSNorm(u), RMSNorm(k)> / sqrt(D))
// and passed through a short causal depthwise convolution with SiLU plus a residual (nn/engram.h).
struct EngramConfig {
  int64_t D = 256;          // model width
  int64_t heads = 4;        // hash heads per n-gram order
  int64_t d_e = 256;        // concatenated row width; a multiple of 2 * heads
  int64_t rows = 65536;     // rows of each table: the smallest prime >= rows, the next ones for the other tables
  int64_t kernel = 4;       // causal convolution width (taps over the current and earlier positions)
  double value_std = 0.02;  // N(0, value_std^2) table rows
  double conv_std = 0.0;    // N(0, conv_std^2) convolution taps; 0: zeros, so the branch starts as x_t alone
  bool sparse_value_grad = false;
  uint64_t seed = 0;        // weights and hash multipliers

  int64_t tables() const { return 2 * heads; }
  int64_t row_width() const { return tables() > 0 ? d_e / tables() : 0; }
  // The tables' row counts M_j: the smallest prime >= rows, then each the smallest prime above the previous
  // (ops/engram_rows.h).
  std::vector<int64_t> table_sizes() const;
  void validate() const;    // std::invalid_argument("EngramConfig.<field>: ...")
};

}  // namespace ultramem::nn
