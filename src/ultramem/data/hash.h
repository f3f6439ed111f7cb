// Small stable hashes used by the data layer: FNV-1a 64 (content and name hashes, input fingerprints,
// the train/validation split) and splitmix64 (the counter-based RNG of the batch sampler). Both are
// fixed functions of their input bytes, identical on every platform and run.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>

namespace ultramem::data {

inline constexpr uint64_t kFnvOffset = 14695981039346656037ull;
inline constexpr uint64_t kFnvPrime = 1099511628211ull;

// FNV-1a 64 of `bytes`, continuing from `h` (pass the result of a previous call to hash a sequence).
inline uint64_t fnv1a64(std::string_view bytes, uint64_t h = kFnvOffset) {
  for (unsigned char c : bytes) {
    h ^= c;
    h *= kFnvPrime;
  }
  return h;
}

// FNV-1a 64 of the 8 little-endian bytes of `v`, continuing from `h`.
inline uint64_t fnv1a64_u64(uint64_t v, uint64_t h) {
  for (int i = 0; i < 8; ++i) {
    h ^= (v >> (8 * i)) & 0xff;
    h *= kFnvPrime;
  }
  return h;
}

// The splitmix64 finaliser: a bijective 64-bit mix with good avalanche.
inline uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Uniform in [0, n) from a 64-bit hash, by the multiply-high method (no modulo). n >= 1.
inline uint64_t hash_to_range(uint64_t h, uint64_t n) {
  return static_cast<uint64_t>((static_cast<unsigned __int128>(h) * n) >> 64);
}

// Uniform double in [0, 1) from the top 53 bits of a 64-bit hash.
inline double hash_to_unit(uint64_t h) { return static_cast<double>(h >> 11) * 0x1.0p-53; }

// 16 lowercase hex digits of `v` (how hashes are written to manifests).
inline std::string hex64(uint64_t v) {
  static const char* digits = "0123456789abcdef";
  std::string s(16, '0');
  for (int i = 15; i >= 0; --i, v >>= 4) s[i] = digits[v & 0xf];
  return s;
}

}  // namespace ultramem::data
