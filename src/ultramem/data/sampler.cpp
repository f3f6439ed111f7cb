#include "ultramem/data/sampler.h"

#include <ATen/ATen.h>

#include <stdexcept>
#include <string>

#include "ultramem/data/hash.h"

namespace ultramem::data {
namespace {

void check_shape(const char* who, int64_t batch, int64_t seq_len) {
  if (batch < 1) throw std::invalid_argument(std::string(who) + ": batch must be >= 1, got " + std::to_string(batch));
  if (seq_len < 1)
    throw std::invalid_argument(std::string(who) + ": seq_len must be >= 1, got " + std::to_string(seq_len));
}

// Fills row `row` of inputs/targets ([B, T] int64, contiguous) from the window starting at `start`.
void fill_row(const TokenShard& shard, int64_t start, int64_t seq_len, int64_t row, std::vector<int64_t>& buf,
              at::Tensor& inputs, at::Tensor& targets) {
  shard.copy_to(start, seq_len + 1, buf.data());
  int64_t* in = inputs.data_ptr<int64_t>() + row * seq_len;
  int64_t* tg = targets.data_ptr<int64_t>() + row * seq_len;
  for (int64_t t = 0; t < seq_len; ++t) {
    in[t] = buf[t];
    tg[t] = buf[t + 1];
  }
}

}  // namespace

BatchSampler::BatchSampler(std::shared_ptr<const TokenShard> shard, int64_t batch, int64_t seq_len, uint64_t seed,
                           int64_t rank, int64_t world)
    : shard_(std::move(shard)), batch_(batch), seq_len_(seq_len), seed_(seed), rank_(rank), world_(world) {
  check_shape("BatchSampler", batch, seq_len);
  if (!shard_) throw std::invalid_argument("BatchSampler: shard is null");
  if (world < 1) throw std::invalid_argument("BatchSampler: world must be >= 1, got " + std::to_string(world));
  if (rank < 0 || rank >= world)
    throw std::invalid_argument("BatchSampler: rank must be in [0, " + std::to_string(world) + "), got " +
                                std::to_string(rank));
  const int64_t n = shard_->size();
  // n * rank / world without overflow for any realistic n (n < 2^40, world < 2^20).
  lo_ = static_cast<int64_t>(static_cast<__int128>(n) * rank / world);
  hi_ = static_cast<int64_t>(static_cast<__int128>(n) * (rank + 1) / world);
  if (hi_ - lo_ < seq_len + 1) {
    std::string where = world > 1 ? "rank " + std::to_string(rank) + " of " + std::to_string(world) +
                                         " has a slice of " + std::to_string(hi_ - lo_) + " tokens"
                                   : "it has " + std::to_string(n) + " tokens";
    throw std::runtime_error("shard: " + shard_->path() + ": too short for windows of seq_len + 1 = " +
                             std::to_string(seq_len + 1) + " tokens (" + where + ")");
  }
}

int64_t BatchSampler::window_start(int64_t k, int64_t i) const {
  uint64_t h = splitmix64(seed_);
  h = splitmix64(h ^ static_cast<uint64_t>(k));
  h = splitmix64(h ^ static_cast<uint64_t>(rank_));
  h = splitmix64(h ^ static_cast<uint64_t>(i));
  const uint64_t starts = static_cast<uint64_t>(hi_ - lo_ - seq_len_);  // >= 1
  return lo_ + static_cast<int64_t>(hash_to_range(h, starts));
}

Batch BatchSampler::batch_at(int64_t k) const {
  if (k < 0) throw std::invalid_argument("BatchSampler: batch number must be >= 0, got " + std::to_string(k));
  Batch b;
  b.inputs = at::empty({batch_, seq_len_}, at::kLong);
  b.targets = at::empty({batch_, seq_len_}, at::kLong);
  std::vector<int64_t> buf(static_cast<size_t>(seq_len_ + 1));
  for (int64_t i = 0; i < batch_; ++i) fill_row(*shard_, window_start(k, i), seq_len_, i, buf, b.inputs, b.targets);
  return b;
}

Batch BatchSampler::next() { return batch_at(position_++); }

void BatchSampler::set_position(int64_t k) {
  if (k < 0) throw std::invalid_argument("BatchSampler: position must be >= 0, got " + std::to_string(k));
  position_ = k;
}

std::vector<Batch> eval_batches(const TokenShard& shard, int64_t batch, int64_t seq_len, int64_t max_batches) {
  check_shape("eval_batches", batch, seq_len);
  const int64_t windows = shard.size() >= 1 ? (shard.size() - 1) / seq_len : 0;
  int64_t n_batches = windows / batch;
  if (n_batches == 0)
    throw std::runtime_error("shard: " + shard.path() + ": " + std::to_string(shard.size()) +
                             " tokens are too few for one evaluation batch of " + std::to_string(batch) +
                             " x (seq_len + 1 = " + std::to_string(seq_len + 1) + ") tokens");
  if (max_batches > 0 && max_batches < n_batches) n_batches = max_batches;
  std::vector<Batch> out;
  out.reserve(static_cast<size_t>(n_batches));
  std::vector<int64_t> buf(static_cast<size_t>(seq_len + 1));
  for (int64_t k = 0; k < n_batches; ++k) {
    Batch b;
    b.inputs = at::empty({batch, seq_len}, at::kLong);
    b.targets = at::empty({batch, seq_len}, at::kLong);
    for (int64_t i = 0; i < batch; ++i) fill_row(shard, (k * batch + i) * seq_len, seq_len, i, buf, b.inputs, b.targets);
    out.push_back(std::move(b));
  }
  return out;
}

}  // namespace ultramem::data
