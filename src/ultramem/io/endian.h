// Byte order of the host. The project's file formats (token shards, safetensors) are little-endian.
#pragma once
#include <cstdint>
#include <cstring>

namespace ultramem::io {

inline bool host_is_little_endian() {
  const uint16_t one = 1;
  unsigned char b;
  std::memcpy(&b, &one, 1);
  return b == 1;
}

}  // namespace ultramem::io
