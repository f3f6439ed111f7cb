// The rows of a value table file (value_table_file.h) behind a cache of fixed capacity, for tables
// larger than memory. A decode step asks for the rows its lookups read: the resident ones cost a memory
// read, the others are read from the file in one batch (io_uring, or pread where the kernel refuses it),
// deduplicated, one read per run of rows within a 4 KiB page span. Eviction is CLOCK (a reference bit per
// slot; the hand clears bits until it finds a slot not referenced since its last pass), which keeps the
// hot rows of Zipfian traffic resident. The rows of the current step are never evicted by that step.
//
// Two phases, so that a memory placed i:j can issue its reads at block i and use them after block j:
//   submit(rows) assigns slots and starts the reads, returns at once;
//   complete(slots) waits for them and gives each row's slot.
// One thread at a time (the decode step's).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "ultramem/kernels/value_table_file.h"

namespace ultramem::kernels {

struct RowCacheStats {
  int64_t lookups = 0;     // rows asked for (with repeats)
  int64_t hits = 0;        // of them resident, or already asked for in the same step
  int64_t misses = 0;      // distinct rows read from the file
  int64_t reads = 0;       // read requests issued (after merging rows within a page span)
  int64_t bytes_read = 0;  // bytes those requests read
};

class RowCache {
 public:
  // capacity_bytes bounds the cache's memory: the rows (row_bytes each, int8 scales stored beside), the
  // slots' state and its index (about 50 bytes per slot in all). Throws std::runtime_error for a bad file
  // (read_table_header) and std::invalid_argument for a capacity below 1024 rows; a capacity above the
  // table's size is cut to it. io_uring false reads with pread (as when the kernel refuses io_uring).
  // direct_io: reads bypass the page cache (O_DIRECT, whole 4 KiB pages), so that the table takes no memory
  // beyond the cap; where the filesystem refuses it (tmpfs) reads are buffered.
  RowCache(const std::string& path, int64_t capacity_bytes, bool io_uring = true, bool direct_io = true);
  ~RowCache();
  RowCache(const RowCache&) = delete;
  RowCache& operator=(const RowCache&) = delete;

  const TableFileInfo& info() const { return info_; }
  const std::string& path() const { return path_; }
  int64_t capacity_rows() const { return capacity_; }
  int64_t memory_bytes() const;  // what the cache holds allocated
  bool uses_io_uring() const;
  bool uses_direct_io() const;

  // rows: [n] physical rows in [0, info().rows). Starts a step: a step's rows stay resident until the next
  // submit. Throws std::invalid_argument for a row out of range or more distinct rows than the capacity.
  void submit(const int64_t* rows, int64_t n);
  // slots: [n] out, the slot of each row of the last submit, in its order. Throws std::runtime_error naming
  // the file when a read failed.
  void complete(int64_t* slots);
  void fetch(const int64_t* rows, int64_t n, int64_t* slots) {
    submit(rows, n);
    complete(slots);
  }

  // The slots' contents: int8 tables hold values [capacity, Dv] and scales [capacity]; bf16 tables bits.
  const int8_t* int8_values() const { return reinterpret_cast<const int8_t*>(data_.get()); }
  const float* int8_scales() const { return scales_.data(); }
  const uint16_t* bf16_values() const { return reinterpret_cast<const uint16_t*>(data_.get()); }

  RowCacheStats stats() const { return stats_; }
  void reset_stats() { stats_ = RowCacheStats{}; }

 private:
  struct Io;
  int64_t find(int64_t row) const;  // slot or -1
  void insert(int64_t row, int64_t slot);
  void erase(int64_t row);
  int64_t evict_slot();

  std::string path_;
  TableFileInfo info_;
  int fd_ = -1;
  bool direct_ = false;  // opened with O_DIRECT
  int64_t capacity_ = 0;   // slots
  int64_t value_bytes_ = 0;  // bytes of one slot's values (Dv int8, or 2 Dv bf16)
  std::unique_ptr<uint8_t[]> data_;  // [capacity, value_bytes]
  std::vector<float> scales_;        // [capacity] int8 row scales
  std::vector<int64_t> slot_row_;    // [capacity] row in each slot, -1 free
  std::vector<uint32_t> slot_step_;  // [capacity] last step that used the slot
  std::vector<uint8_t> slot_ref_;    // [capacity] CLOCK reference bits
  std::vector<int64_t> keys_;        // open-addressing index row -> slot: keys (-1 empty) ...
  std::vector<int32_t> vals_;        // ... and slots
  uint64_t index_mask_ = 0;
  int64_t hand_ = 0;
  uint32_t step_ = 0;
  std::vector<int64_t> pending_rows_;   // the last submit's rows, in order
  std::vector<int64_t> pending_slots_;  // and their slots
  std::unique_ptr<Io> io_;
  RowCacheStats stats_;
};

}  // namespace ultramem::kernels
