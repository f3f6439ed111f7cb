#include "ultramem/kernels/value_table_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "ultramem/kernels/value_quant.h"

namespace ultramem::kernels {
namespace {

constexpr char kMagic[8] = {'U', 'M', 'V', 'A', 'L', 'T', 'A', 'B'};
constexpr uint32_t kVersion = 1;
constexpr int64_t kDataOffset = 4096;
constexpr size_t kHashedBytes = 48;  // magic .. data_offset

uint64_t fnv1a64(const uint8_t* p, size_t n) {
  uint64_t h = 14695981039346656037ull;
  for (size_t i = 0; i < n; ++i) {
    h ^= p[i];
    h *= 1099511628211ull;
  }
  return h;
}

template <typename T>
void put(uint8_t* at, T v) {
  std::memcpy(at, &v, sizeof v);  // little-endian hosts only (x86-64, aarch64)
}
template <typename T>
T get(const uint8_t* at) {
  T v;
  std::memcpy(&v, at, sizeof v);
  return v;
}

std::string errno_text() { return std::strerror(errno); }

// Writes all of buf at offset, retrying short writes; false with errno set on failure.
bool pwrite_all(int fd, const uint8_t* buf, size_t n, int64_t offset) {
  while (n > 0) {
    const ssize_t w = ::pwrite(fd, buf, n, offset);
    if (w < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    buf += w;
    n -= size_t(w);
    offset += w;
  }
  return true;
}

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

}  // namespace

const char* to_string(TableFormat f) { return f == TableFormat::kInt8 ? "int8" : "bf16"; }

void gaussian_rows(uint64_t seed, float std, int64_t first, int64_t count, int64_t dv, float* out) {
#pragma omp parallel for schedule(static) if (count * dv >= (1 << 16))
  for (int64_t r = 0; r < count; ++r) {
    uint64_t state = seed * 0xD1B54A32D192ED03ull ^ uint64_t(first + r) * 0x9E3779B97F4A7C15ull;
    float* row = out + r * dv;
    for (int64_t c = 0; c < dv; c += 2) {  // Box-Muller: two normals per pair of uniforms in (0, 1]
      const double u1 = (double(splitmix64(state) >> 11) + 1.0) * 0x1.0p-53;
      const double u2 = double(splitmix64(state) >> 11) * 0x1.0p-53;
      const double radius = std::sqrt(-2.0 * std::log(u1));
      row[c] = float(std * radius * std::cos(6.283185307179586 * u2));
      if (c + 1 < dv) row[c + 1] = float(std * radius * std::sin(6.283185307179586 * u2));
    }
  }
}

void write_table_file(const std::string& path, TableFormat format, int64_t rows, int64_t dv, const RowFill& fill,
                      int64_t chunk_rows, const std::function<void(int64_t)>& progress) {
  if (rows < 1 || dv < 1 || dv > (int64_t(1) << 20) || rows > (int64_t(1) << 40))
    throw std::invalid_argument(path + ": a value table needs rows in [1, 2^40] and Dv in [1, 2^20], got " +
                                std::to_string(rows) + " x " + std::to_string(dv));
  if (format != TableFormat::kInt8 && format != TableFormat::kBf16)
    throw std::invalid_argument(path + ": unknown table format");
  if (chunk_rows < 1) chunk_rows = 1;
  const int64_t row_bytes = table_row_bytes(format, dv);
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw std::runtime_error(path + ": cannot create " + tmp + ": " + errno_text());
  auto fail = [&](const std::string& what) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw std::runtime_error(path + ": " + what);
  };

  std::vector<float> values(size_t(chunk_rows * dv));
  std::vector<uint8_t> out(size_t(chunk_rows * row_bytes));
  for (int64_t first = 0; first < rows; first += chunk_rows) {
    const int64_t count = std::min(chunk_rows, rows - first);
    try {
      fill(first, count, values.data());
    } catch (const std::exception& e) {
      fail(std::string("producing rows failed: ") + e.what());
    }
    // Rows are quantised independently: in parallel; the first bad row (lowest index) is reported.
    int64_t bad_row = -1;
#pragma omp parallel for schedule(static) if (count * dv >= (1 << 16))
    for (int64_t r = 0; r < count; ++r) {
      const float* src = values.data() + r * dv;
      uint8_t* dst = out.data() + r * row_bytes;
      if (format == TableFormat::kInt8) {
        float scale = 0;
        if (quantize_int8_rows(src, 1, dv, reinterpret_cast<int8_t*>(dst), &scale) >= 0) {
#pragma omp critical
          bad_row = bad_row < 0 ? r : std::min(bad_row, r);
        }
        put<float>(dst + dv, scale);
      } else {
        quantize_bf16(src, dv, reinterpret_cast<uint16_t*>(dst));
      }
    }
    if (bad_row >= 0) fail("row " + std::to_string(first + bad_row) + " holds a non-finite value");
    if (!pwrite_all(fd, out.data(), size_t(count * row_bytes), kDataOffset + first * row_bytes))
      fail("writing rows to " + tmp + " failed: " + errno_text());
    if (progress) progress(first + count);
  }

  // The header last, then flush, then the rename: a table file at `path` is always complete.
  uint8_t header[kDataOffset] = {};
  std::memcpy(header, kMagic, 8);
  put<uint32_t>(header + 8, kVersion);
  put<uint32_t>(header + 12, uint32_t(format));
  put<uint64_t>(header + 16, uint64_t(rows));
  put<uint64_t>(header + 24, uint64_t(dv));
  put<uint64_t>(header + 32, uint64_t(row_bytes));
  put<uint64_t>(header + 40, uint64_t(kDataOffset));
  put<uint64_t>(header + kHashedBytes, fnv1a64(header, kHashedBytes));
  if (!pwrite_all(fd, header, sizeof header, 0)) fail("writing the header of " + tmp + " failed: " + errno_text());
  if (::fsync(fd) != 0) fail("flushing " + tmp + " failed: " + errno_text());
  if (::close(fd) != 0) {
    ::unlink(tmp.c_str());
    throw std::runtime_error(path + ": closing " + tmp + " failed: " + errno_text());
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string err = errno_text();
    ::unlink(tmp.c_str());
    throw std::runtime_error(path + ": renaming " + tmp + " failed: " + err);
  }
}

TableFileInfo read_table_header(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error("value table " + path + ": cannot open: " + errno_text());
  uint8_t header[56];
  const ssize_t got = ::pread(fd, header, sizeof header, 0);
  struct stat st {};
  const bool stat_ok = ::fstat(fd, &st) == 0;
  ::close(fd);
  auto bad = [&](const std::string& why) { throw std::runtime_error("value table " + path + ": " + why); };
  if (got != ssize_t(sizeof header) || std::memcmp(header, kMagic, 8) != 0)
    bad("not a value table file (no UMVALTAB header)");
  if (get<uint64_t>(header + kHashedBytes) != fnv1a64(header, kHashedBytes)) bad("the header is damaged (hash mismatch)");
  if (get<uint32_t>(header + 8) != kVersion)
    bad("version " + std::to_string(get<uint32_t>(header + 8)) + ", this build reads version 1");
  TableFileInfo info;
  const uint32_t format = get<uint32_t>(header + 12);
  if (format != uint32_t(TableFormat::kInt8) && format != uint32_t(TableFormat::kBf16))
    bad("unknown format " + std::to_string(format));
  info.format = TableFormat(format);
  info.rows = int64_t(get<uint64_t>(header + 16));
  info.dv = int64_t(get<uint64_t>(header + 24));
  info.row_bytes = int64_t(get<uint64_t>(header + 32));
  info.data_offset = int64_t(get<uint64_t>(header + 40));
  if (info.rows < 1 || info.rows > (int64_t(1) << 40) || info.dv < 1 || info.dv > (int64_t(1) << 20) ||
      info.row_bytes != table_row_bytes(info.format, info.dv) || info.data_offset != kDataOffset)
    bad("inconsistent sizes in the header");
  const int64_t expected = info.data_offset + info.rows * info.row_bytes;
  if (!stat_ok || int64_t(st.st_size) != expected)
    bad("the file has " + std::to_string(int64_t(st.st_size)) + " bytes, the header says " + std::to_string(expected) +
        " (" + std::to_string(info.rows) + " rows of " + std::to_string(info.row_bytes) + " bytes): truncated or damaged");
  return info;
}

}  // namespace ultramem::kernels
