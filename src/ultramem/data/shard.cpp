#include "ultramem/data/shard.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string_view>

#include "ultramem/io/atomic_file.h"
#include "ultramem/io/endian.h"

namespace ultramem::data {
namespace {

static_assert(sizeof(uint16_t) == 2 && sizeof(uint32_t) == 4, "fixed-width integers");

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw std::runtime_error("shard: " + path + ": " + what);
}

void put_u32(unsigned char* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<unsigned char>(v >> (8 * i));
}
void put_u64(unsigned char* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<unsigned char>(v >> (8 * i));
}
uint32_t get_u32(const unsigned char* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= uint32_t(p[i]) << (8 * i);
  return v;
}
uint64_t get_u64(const unsigned char* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= uint64_t(p[i]) << (8 * i);
  return v;
}

// zlib's crc32 takes a 32-bit length; feed it in pieces.
uint32_t crc32_of(const unsigned char* p, size_t n) {
  uLong crc = ::crc32(0L, Z_NULL, 0);
  while (n > 0) {
    const uInt len = static_cast<uInt>(std::min<size_t>(n, size_t(1) << 30));
    crc = ::crc32(crc, p, len);
    p += len;
    n -= len;
  }
  return static_cast<uint32_t>(crc);
}

size_t dtype_bytes(TokenDtype d) { return d == TokenDtype::U16 ? 2 : 4; }

}  // namespace

TokenDtype shard_dtype_for(int64_t vocab_size) {
  return vocab_size <= 65536 ? TokenDtype::U16 : TokenDtype::U32;
}

void write_shard(const std::string& path, const std::vector<int32_t>& tokens, int64_t vocab_size) {
  if (!io::host_is_little_endian()) fail(path, "writing needs a little-endian host");
  if (vocab_size < 1 || vocab_size > int64_t(0xffffffffu))
    throw std::invalid_argument("write_shard: " + path + ": vocab_size must be in [1, 2^32), got " +
                                std::to_string(vocab_size));
  const TokenDtype dtype = shard_dtype_for(vocab_size);
  std::string payload(tokens.size() * dtype_bytes(dtype), '\0');
  auto* out = reinterpret_cast<unsigned char*>(payload.data());
  for (size_t i = 0; i < tokens.size(); ++i) {
    const int32_t t = tokens[i];
    if (t < 0 || t >= vocab_size)
      throw std::invalid_argument("write_shard: " + path + ": token " + std::to_string(t) + " at position " +
                                  std::to_string(i) + " is outside [0, " + std::to_string(vocab_size) + ")");
    if (dtype == TokenDtype::U16) {
      const uint16_t v = static_cast<uint16_t>(t);
      std::memcpy(out + 2 * i, &v, 2);
    } else {
      const uint32_t v = static_cast<uint32_t>(t);
      std::memcpy(out + 4 * i, &v, 4);
    }
  }
  unsigned char header[kShardHeaderBytes];
  std::memcpy(header, kShardMagic, 8);
  put_u32(header + 8, kShardVersion);
  put_u32(header + 12, static_cast<uint32_t>(dtype));
  put_u64(header + 16, tokens.size());
  put_u32(header + 24, static_cast<uint32_t>(vocab_size));
  put_u32(header + 28, crc32_of(out, payload.size()));
  io::write_file_atomically(path, {std::string_view(reinterpret_cast<const char*>(header), sizeof header), payload});
}

std::shared_ptr<const TokenShard> TokenShard::open(const std::string& path, const ShardReadOptions& options) {
  return std::make_shared<const TokenShard>(path, options);
}

TokenShard::TokenShard(const std::string& path, const ShardReadOptions& options) : path_(path) {
  if (!io::host_is_little_endian()) fail(path, "reading needs a little-endian host");
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(path, errno == ENOENT ? "file not found" : std::string("cannot open: ") + std::strerror(errno));
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const std::string err = std::strerror(errno);
    ::close(fd);
    fail(path, "cannot stat: " + err);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(path, "not a regular file");
  }
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);
  if (file_size < uint64_t(kShardHeaderBytes)) {
    ::close(fd);
    fail(path, "file too short (" + std::to_string(file_size) + " bytes; the header alone is 32 bytes): truncated or not a token shard");
  }
  void* map = ::mmap(nullptr, file_size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_errno = errno;
  ::close(fd);
  if (map == MAP_FAILED) fail(path, std::string("mmap failed: ") + std::strerror(map_errno));
  map_ = map;
  map_bytes_ = file_size;
  // From here on a throw must unmap: the destructor does not run for a throwing constructor.
  try {
    const auto* h = static_cast<const unsigned char*>(map_);
    if (std::memcmp(h, kShardMagic, 8) != 0) fail(path, "bad magic (expected \"UMTOKENS\"): not a token shard");
    const uint32_t version = get_u32(h + 8);
    if (version != kShardVersion)
      fail(path, "unsupported version " + std::to_string(version) + " (this build reads version 1)");
    const uint32_t dtype = get_u32(h + 12);
    if (dtype != 1 && dtype != 2)
      fail(path, "unsupported dtype code " + std::to_string(dtype) + " (1 = uint16, 2 = uint32)");
    dtype_ = static_cast<TokenDtype>(dtype);
    const uint64_t count = get_u64(h + 16);
    vocab_size_ = get_u32(h + 24);
    crc_ = get_u32(h + 28);
    if (vocab_size_ == 0) fail(path, "vocab_size is 0");
    if (dtype_ == TokenDtype::U16 && vocab_size_ > 65536)
      fail(path, "dtype uint16 cannot hold vocab_size " + std::to_string(vocab_size_));
    const uint64_t elem = dtype_bytes(dtype_);
    const uint64_t payload_bytes = file_size - kShardHeaderBytes;
    if (count > payload_bytes / elem || count * elem != payload_bytes)
      fail(path, "size mismatch: header says " + std::to_string(count) + " tokens (" +
                     std::to_string(kShardHeaderBytes + count * elem) + " bytes) but the file has " +
                     std::to_string(file_size) + " bytes" + (count * elem > payload_bytes ? ": truncated" : ""));
    if (options.expected_vocab_size > 0 && options.expected_vocab_size != vocab_size_)
      fail(path, "vocab_size " + std::to_string(vocab_size_) + " does not match the expected " +
                     std::to_string(options.expected_vocab_size) + " (shard made with another tokenizer?)");
    count_ = static_cast<int64_t>(count);
    payload_ = h + kShardHeaderBytes;
    if (options.verify_payload) {
      const uint32_t crc = crc32_of(payload_, payload_bytes);
      if (crc != crc_)
        fail(path, "checksum mismatch (header crc32 " + std::to_string(crc_) + ", payload crc32 " +
                       std::to_string(crc) + "): the file is corrupted");
      for (int64_t i = 0; i < count_; ++i) {
        const int64_t t = at(i);
        if (t >= vocab_size_)
          fail(path, "token id " + std::to_string(t) + " at position " + std::to_string(i) +
                         " is >= vocab_size " + std::to_string(vocab_size_));
      }
    }
  } catch (...) {
    ::munmap(map_, map_bytes_);
    map_ = nullptr;
    throw;
  }
}

TokenShard::~TokenShard() {
  if (map_) ::munmap(map_, map_bytes_);
}

int64_t TokenShard::at(int64_t i) const {
  if (i < 0 || i >= count_)
    throw std::out_of_range("shard: " + path_ + ": token index " + std::to_string(i) + " outside [0, " +
                            std::to_string(count_) + ")");
  if (dtype_ == TokenDtype::U16) {
    uint16_t v;
    std::memcpy(&v, payload_ + 2 * i, 2);
    return v;
  }
  uint32_t v;
  std::memcpy(&v, payload_ + 4 * i, 4);
  return v;
}

void TokenShard::copy_to(int64_t start, int64_t count, int64_t* out) const {
  if (start < 0 || count < 0 || start > count_ - count)
    throw std::out_of_range("shard: " + path_ + ": range [" + std::to_string(start) + ", " +
                            std::to_string(start + count) + ") outside [0, " + std::to_string(count_) + ")");
  if (dtype_ == TokenDtype::U16) {
    const unsigned char* p = payload_ + 2 * start;
    for (int64_t i = 0; i < count; ++i) {
      uint16_t v;
      std::memcpy(&v, p + 2 * i, 2);
      out[i] = v;
    }
  } else {
    const unsigned char* p = payload_ + 4 * start;
    for (int64_t i = 0; i < count; ++i) {
      uint32_t v;
      std::memcpy(&v, p + 4 * i, 4);
      out[i] = v;
    }
  }
}

std::vector<int32_t> TokenShard::tokens() const {
  std::vector<int64_t> tmp(static_cast<size_t>(count_));
  copy_to(0, count_, tmp.data());
  return std::vector<int32_t>(tmp.begin(), tmp.end());
}

}  // namespace ultramem::data
