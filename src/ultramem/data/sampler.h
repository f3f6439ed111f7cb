// Training and evaluation batches from a token shard.
//
// Training (BatchSampler): batch k holds `batch` random windows of seq_len + 1 consecutive tokens;
// inputs are the first seq_len tokens of each window, targets the last seq_len (inputs shifted by one).
// The windows are a pure function of (seed, k, rank, world): row i of batch k starts at
//   lo + hash_to_range(h, count),  h = splitmix64(splitmix64(splitmix64(splitmix64(seed) ^ k) ^ rank) ^ i)
// where [lo, hi) is the rank's slice of the shard and count = (hi - lo) - seq_len is the number of window
// starts inside it. So training resumes exactly from a saved position() with set_position().
// With world > 1, rank r draws only from the r-th contiguous slice [r*n/world, (r+1)*n/world) of the
// n tokens and every window lies wholly inside that slice: different ranks never read the same token.
//
// Evaluation (eval_batches): fixed windows in order from the start of the shard, with stride seq_len:
// window j has inputs tokens [j*T, j*T + T) and targets [j*T + 1, j*T + T + 1), so each token after the
// first is a target at most once. Windows are grouped into batches of `batch`; the last partial batch
// is dropped.
#pragma once
#include <torch/types.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "ultramem/data/batch.h"
#include "ultramem/data/shard.h"

namespace ultramem::data {

class BatchSampler {
 public:
  // std::invalid_argument for batch < 1, seq_len < 1, world < 1, rank outside [0, world) or a null shard;
  // std::runtime_error (naming the shard) when the rank's slice is shorter than seq_len + 1 tokens.
  BatchSampler(std::shared_ptr<const TokenShard> shard, int64_t batch, int64_t seq_len, uint64_t seed,
               int64_t rank = 0, int64_t world = 1);

  Batch next();                    // batch_at(position()), then advances the position by one
  Batch batch_at(int64_t k) const; // batch number k (k >= 0), without changing the position
  int64_t position() const { return position_; }  // number of the next batch next() returns
  void set_position(int64_t k);    // k >= 0 (std::invalid_argument otherwise)

  int64_t window_start(int64_t k, int64_t i) const;  // first token of row i of batch k
  int64_t slice_begin() const { return lo_; }        // this rank's token slice [slice_begin, slice_end)
  int64_t slice_end() const { return hi_; }

 private:
  std::shared_ptr<const TokenShard> shard_;
  int64_t batch_, seq_len_;
  uint64_t seed_;
  int64_t rank_, world_;
  int64_t lo_ = 0, hi_ = 0;
  int64_t position_ = 0;
};

// Evaluation batches (see above), at most max_batches of them (max_batches <= 0: all). std::invalid_argument
// for batch < 1 or seq_len < 1; std::runtime_error naming the shard if it is too short for one batch.
std::vector<Batch> eval_batches(const TokenShard& shard, int64_t batch, int64_t seq_len, int64_t max_batches);

}  // namespace ultramem::data
