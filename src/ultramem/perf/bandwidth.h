// Memory bandwidth probes of this machine, the references for `ultramem bench decode`: sequential
// read bandwidth, and random-row gather bandwidth (rows of a given size read at uniformly random row
// ids, with or without software prefetch) on buffers backed by 4 KiB pages or transparent huge pages.
// No libtorch. Hot loops use AVX2 when the CPU has it (chosen at run time).
#pragma once
#include <cstddef>
#include <cstdint>

namespace ultramem::perf {

// A 2 MiB-aligned buffer whose pages are all touched (filled with a fixed pattern) at construction.
// huge_pages: madvise(MADV_HUGEPAGE) before the first touch, else madvise(MADV_NOHUGEPAGE).
// Throws std::runtime_error when the allocation fails.
class ProbeBuffer {
 public:
  ProbeBuffer(size_t bytes, bool huge_pages);
  ~ProbeBuffer();
  ProbeBuffer(const ProbeBuffer&) = delete;
  ProbeBuffer& operator=(const ProbeBuffer&) = delete;

  const unsigned char* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  bool huge_pages_requested() const { return huge_; }

 private:
  unsigned char* data_ = nullptr;
  size_t bytes_ = 0;
  bool huge_ = false;
};

// Bytes of [p, p + bytes) backed by transparent huge pages, from /proc/self/smaps; -1 when unknown.
int64_t huge_page_bytes(const void* p, size_t bytes);

// The system's THP mode, e.g. "always [madvise] never" (empty when unknown).
const char* thp_mode();

struct BandwidthResult {
  double gbps_median = 0;  // bytes / median iteration time
  double gbps_best = 0;    // bytes / fastest iteration
  int64_t iterations = 0;
  int64_t bytes_per_iteration = 0;
};

// Sequential read of the whole buffer in chunks of `chunk_bytes` (a multiple of 64), walking through
// it so no chunk is cache-resident; `threads` split each chunk. Runs for at least min_seconds.
BandwidthResult sequential_read(const ProbeBuffer& buf, int threads, double min_seconds,
                                int64_t chunk_bytes = int64_t(32) << 20);

struct GatherOptions {
  int64_t rows = 0;       // table rows; rows * row_bytes <= buffer size
  int64_t row_bytes = 0;  // bytes per row, a multiple of 64
  int prefetch_rows = 0;  // 0: plain loads; d > 0: prefetch the row d rows ahead (prefetcht2)
  int threads = 1;
  double min_seconds = 0.2;
  int64_t rows_per_iteration = 8192;
  uint64_t seed = 1;
};

// Random-row gather: every iteration reads rows_per_iteration whole rows at uniform random row ids
// (a fixed pool of ids, rotated) of the first rows * row_bytes bytes of the table, accumulating them
// into one small accumulator (as a pooled lookup does). `table` (64-byte aligned, `bytes` long) may be
// any memory, e.g. a value table itself. Throws std::invalid_argument for bad options.
BandwidthResult random_row_gather(const void* table, size_t bytes, const GatherOptions& o);
inline BandwidthResult random_row_gather(const ProbeBuffer& buf, const GatherOptions& o) {
  return random_row_gather(buf.data(), buf.bytes(), o);
}

}  // namespace ultramem::perf
