// A keyed bijection on [0, size) that takes no memory: the IVE permutation of a table too large to store
// its permutation (2^30 virtual slots would need 8 GiB of int64). A balanced Feistel network on the
// smallest even number of bits 2h with 2^(2h) >= size, four rounds of a keyed 64-bit mix, and cycle
// walking: an output outside [0, size) is permuted again until it falls inside, which keeps the map a
// bijection of [0, size) (each walk visits a cycle of the network's permutation of [0, 2^(2h)), which
// returns to the start, so it meets [0, size) again). Since 2^(2h) < 4 * size, the expected number of
// steps is below 4. Saved as its key: the same (size, key) gives the same permutation on every platform.
#pragma once
#include <cstdint>

namespace ultramem::kernels {

class FeistelPermutation {
 public:
  FeistelPermutation() = default;
  // size >= 1 and size <= 2^62.
  FeistelPermutation(uint64_t size, uint64_t key) : size_(size), key_(key) {
    uint32_t bits = 0;
    while (bits < 62 && (uint64_t(1) << bits) < size) ++bits;
    half_ = (bits + 1) / 2;
    if (half_ == 0) half_ = 1;
    mask_ = (uint64_t(1) << half_) - 1;
  }

  uint64_t size() const { return size_; }
  uint64_t key() const { return key_; }

  // x in [0, size) -> its image in [0, size).
  uint64_t forward(uint64_t x) const {
    do x = network(x, false);
    while (x >= size_);
    return x;
  }
  // The inverse: inverse(forward(x)) == x.
  uint64_t inverse(uint64_t y) const {
    do y = network(y, true);
    while (y >= size_);
    return y;
  }

 private:
  static constexpr int kRounds = 4;

  // A keyed mix of one half (splitmix64's finaliser over the half, the key and the round).
  uint64_t round_fn(uint64_t half, int round) const {
    uint64_t z = half + key_ * 0x9E3779B97F4A7C15ull + uint64_t(round + 1) * 0xD1B54A32D192ED03ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return (z ^ (z >> 31)) & mask_;
  }

  // One pass of the network over [0, 2^(2h)): (L, R) -> (R, L ^ f(R)) per round; backwards for the inverse.
  uint64_t network(uint64_t x, bool backwards) const {
    uint64_t l = x >> half_, r = x & mask_;
    if (!backwards) {
      for (int i = 0; i < kRounds; ++i) {
        const uint64_t t = l ^ round_fn(r, i);
        l = r;
        r = t;
      }
    } else {
      for (int i = kRounds - 1; i >= 0; --i) {
        const uint64_t t = r ^ round_fn(l, i);
        r = l;
        l = t;
      }
    }
    return (l << half_) | r;
  }

  uint64_t size_ = 1, key_ = 0, mask_ = 1;
  uint32_t half_ = 1;
};

}  // namespace ultramem::kernels
