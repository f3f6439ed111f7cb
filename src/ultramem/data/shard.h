// Token shards: one binary file holding a token stream (a split of the corpus, documents concatenated
// with an EOS token after each document).
//
// Layout (all integers little-endian):
//   offset  0  char[8]  magic "UMTOKENS"
//   offset  8  uint32   version = 1
//   offset 12  uint32   dtype: 1 = uint16 tokens, 2 = uint32 tokens (uint16 iff vocab_size <= 65536)
//   offset 16  uint64   token count n
//   offset 24  uint32   vocab_size (every token id is < vocab_size)
//   offset 28  uint32   CRC-32 (zlib polynomial) of the payload bytes
//   offset 32  payload: n tokens of the dtype; the file size is exactly 32 + n * sizeof(dtype)
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace ultramem::data {

inline constexpr char kShardMagic[8] = {'U', 'M', 'T', 'O', 'K', 'E', 'N', 'S'};
inline constexpr uint32_t kShardVersion = 1;
inline constexpr int64_t kShardHeaderBytes = 32;

enum class TokenDtype : uint32_t { U16 = 1, U32 = 2 };

// The dtype the writer uses for a vocabulary: U16 when vocab_size <= 65536, else U32.
TokenDtype shard_dtype_for(int64_t vocab_size);

// Writes `tokens` as a shard atomically (temporary file, fflush + fsync, rename). Throws
// std::invalid_argument if vocab_size is not in [1, 2^32) or a token is outside [0, vocab_size), and
// std::runtime_error naming the file if it cannot be written.
void write_shard(const std::string& path, const std::vector<int32_t>& tokens, int64_t vocab_size);

struct ShardReadOptions {
  // Check the CRC-32 and that every token is < vocab_size (one pass over the payload). Turning it off
  // is meant only for huge files whose integrity is known; header and size checks always run.
  bool verify_payload = true;
  int64_t expected_vocab_size = 0;  // when > 0, the header's vocab_size must equal it
};

// A read-only, memory-mapped shard. Opening validates the file; every failure is a std::runtime_error
// "shard: <path>: <problem>": missing file, too short for the header, wrong magic, unsupported version or
// dtype, dtype U16 with vocab_size > 65536, file size not matching the token count (truncated or
// trailing bytes), CRC mismatch (corrupted), token id >= vocab_size, vocab_size not the expected one.
class TokenShard {
 public:
  static std::shared_ptr<const TokenShard> open(const std::string& path, const ShardReadOptions& options = {});
  TokenShard(const std::string& path, const ShardReadOptions& options);
  ~TokenShard();
  TokenShard(const TokenShard&) = delete;
  TokenShard& operator=(const TokenShard&) = delete;

  const std::string& path() const { return path_; }
  int64_t size() const { return count_; }  // number of tokens
  int64_t vocab_size() const { return vocab_size_; }
  TokenDtype dtype() const { return dtype_; }
  uint32_t crc32() const { return crc_; }  // as stored in the header

  int64_t at(int64_t i) const;  // token i; std::out_of_range outside [0, size())
  // Copies tokens [start, start + count) to `out` as int64; std::out_of_range if the range is outside.
  void copy_to(int64_t start, int64_t count, int64_t* out) const;
  std::vector<int32_t> tokens() const;  // all tokens (for tests and small shards)

 private:
  std::string path_;
  void* map_ = nullptr;
  size_t map_bytes_ = 0;
  const unsigned char* payload_ = nullptr;
  int64_t count_ = 0;
  int64_t vocab_size_ = 0;
  TokenDtype dtype_ = TokenDtype::U16;
  uint32_t crc_ = 0;
};

}  // namespace ultramem::data
