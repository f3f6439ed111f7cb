#include "ultramem/kernels/row_cache.h"

#include <fcntl.h>
#include <liburing.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

namespace ultramem::kernels {
namespace {

constexpr int64_t kPage = 4096;
// Reads in flight at once: a whole step's misses (thousands at batch 64 under uniform traffic) go to the
// kernel when the retrieval knows them, so they run while the blocks before the lookup compute; a ring
// the kernel refuses at this depth falls back to kSmallQueueDepth.
constexpr unsigned kQueueDepth = 4096;
constexpr unsigned kSmallQueueDepth = 256;
constexpr int64_t kMaxDirectRead = int64_t(1) << 20;  // a direct read stops merging runs at this length
// Bytes per slot besides its values, for a first guess of the capacity: int8 scale, row, step, reference
// bit, and the index (two to four entries of a 64-bit key and a 32-bit slot per slot).
constexpr int64_t kSlotOverhead = 4 + 8 + 4 + 1 + 3 * (8 + 4);

uint64_t mix(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  return x;
}

}  // namespace

// One read of a run of rows: bytes [offset, offset + length) of the file into staging + at. `need` bytes
// of them must arrive (a direct read's length is rounded up to whole pages, past the end of the file for
// the last rows).
struct Span {
  int64_t offset = 0, length = 0, at = 0, need = 0;
  size_t first = 0, count = 0;  // misses_[first, first + count) lie in it
};

// The reads' landing area, page-aligned as direct reads require.
class Staging {
 public:
  uint8_t* data() { return data_.get(); }
  void resize(int64_t bytes) {
    if (bytes <= capacity_) return;
    const int64_t cap = std::max<int64_t>((bytes + kPage - 1) / kPage * kPage, 2 * capacity_);
    void* p = std::aligned_alloc(size_t(kPage), size_t(cap));
    if (!p) throw std::bad_alloc();
    data_.reset(static_cast<uint8_t*>(p));
    capacity_ = cap;
  }

 private:
  struct Free {
    void operator()(uint8_t* p) const { std::free(p); }
  };
  std::unique_ptr<uint8_t, Free> data_;
  int64_t capacity_ = 0;
};

struct RowCache::Io {
  io_uring ring{};
  bool uring = false;
  unsigned depth = 0;  // the ring's entries
  std::vector<std::pair<int64_t, int64_t>> misses;  // (row, slot), sorted by row
  std::vector<Span> spans;
  Staging staging;
  size_t next = 0;     // spans submitted so far
  size_t done = 0;     // spans completed
  bool pending = false;
};

RowCache::RowCache(const std::string& path, int64_t capacity_bytes, bool io_uring, bool direct_io)
    : path_(path), info_(read_table_header(path)), io_(std::make_unique<Io>()) {
  value_bytes_ = info_.format == TableFormat::kInt8 ? info_.dv : 2 * info_.dv;
  // The most slots whose rows, scales, slot state and index (a power of two >= 2 slots) fit in the bytes.
  const int64_t scale_bytes = info_.format == TableFormat::kInt8 ? 4 : 0;
  auto index_size = [](int64_t slots) {
    uint64_t size = 1;
    while (size < uint64_t(2 * slots)) size <<= 1;
    return int64_t(size);
  };
  auto bytes_for = [&](int64_t slots) {
    return slots * (value_bytes_ + scale_bytes + 8 + 4 + 1) + index_size(slots) * (8 + 4);
  };
  capacity_ = std::min(std::max<int64_t>(capacity_bytes, 0) / (value_bytes_ + kSlotOverhead), info_.rows);
  while (capacity_ > 0 && bytes_for(capacity_) > capacity_bytes) capacity_ -= std::max<int64_t>(1, capacity_ / 64);
  if (capacity_ < std::min<int64_t>(1024, info_.rows))
    throw std::invalid_argument("value table " + path + ": a cache of " + std::to_string(capacity_bytes) +
                                " bytes holds fewer than 1024 rows of " + std::to_string(value_bytes_) + " bytes");
  if (capacity_ >= (int64_t(1) << 31)) capacity_ = (int64_t(1) << 31) - 1;
  // Direct reads bypass the page cache, so the cache's cap bounds the memory the table takes (buffered
  // reads would also keep a 4 KiB page per row read). Filesystems without them (tmpfs) get buffered reads.
  fd_ = direct_io ? ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT) : -1;
  direct_ = fd_ >= 0;
  if (fd_ < 0) fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) throw std::runtime_error("value table " + path + ": cannot open: " + std::strerror(errno));
  ::posix_fadvise(fd_, 0, 0, POSIX_FADV_RANDOM);  // no read-ahead: the rows of a step are scattered
  data_.reset(new uint8_t[size_t(capacity_ * value_bytes_)]);
  if (info_.format == TableFormat::kInt8) scales_.assign(size_t(capacity_), 0.0f);
  slot_row_.assign(size_t(capacity_), -1);
  slot_step_.assign(size_t(capacity_), 0);
  slot_ref_.assign(size_t(capacity_), 0);
  keys_.assign(size_t(index_size(capacity_)), -1);
  vals_.assign(keys_.size(), 0);
  index_mask_ = keys_.size() - 1;
  if (io_uring) {
    for (const unsigned depth : {kQueueDepth, kSmallQueueDepth}) {
      if (io_uring_queue_init(depth, &io_->ring, 0) == 0) {
        io_->uring = true;
        io_->depth = depth;
        break;
      }
    }
  }
}

RowCache::~RowCache() {
  if (io_ && io_->pending && io_->uring) {  // drain reads still in flight into buffers about to be freed
    while (io_->done < io_->next) {
      io_uring_cqe* cqe = nullptr;
      if (io_uring_wait_cqe(&io_->ring, &cqe) != 0) break;
      io_uring_cqe_seen(&io_->ring, cqe);
      ++io_->done;
    }
  }
  if (io_ && io_->uring) io_uring_queue_exit(&io_->ring);
  if (fd_ >= 0) ::close(fd_);
}

int64_t RowCache::memory_bytes() const {
  return capacity_ * value_bytes_ + int64_t(scales_.size()) * 4 + capacity_ * (8 + 4 + 1) +
         int64_t(keys_.size()) * (8 + 4);
}

bool RowCache::uses_io_uring() const { return io_->uring; }
bool RowCache::uses_direct_io() const { return direct_; }

int64_t RowCache::find(int64_t row) const {
  for (uint64_t i = mix(uint64_t(row)) & index_mask_;; i = (i + 1) & index_mask_) {
    if (keys_[i] == row) return vals_[i];
    if (keys_[i] < 0) return -1;
  }
}

void RowCache::insert(int64_t row, int64_t slot) {
  uint64_t i = mix(uint64_t(row)) & index_mask_;
  while (keys_[i] >= 0) i = (i + 1) & index_mask_;
  keys_[i] = row;
  vals_[i] = int32_t(slot);
}

// Linear probing's deletion: the entries after the hole that would no longer be found move back into it.
void RowCache::erase(int64_t row) {
  uint64_t i = mix(uint64_t(row)) & index_mask_;
  while (keys_[i] != row) i = (i + 1) & index_mask_;
  keys_[i] = -1;
  for (uint64_t j = (i + 1) & index_mask_; keys_[j] >= 0; j = (j + 1) & index_mask_) {
    const uint64_t home = mix(uint64_t(keys_[j])) & index_mask_;
    const bool reachable = i <= j ? (home > i && home <= j) : (home > i || home <= j);
    if (reachable) continue;  // probing from its home reaches j without passing the hole
    keys_[i] = keys_[j];
    vals_[i] = vals_[j];
    keys_[j] = -1;
    i = j;
  }
}

int64_t RowCache::evict_slot() {
  for (int64_t scanned = 0; scanned <= 2 * capacity_; ++scanned) {
    const int64_t s = hand_;
    hand_ = hand_ + 1 == capacity_ ? 0 : hand_ + 1;
    if (slot_row_[size_t(s)] < 0) return s;
    if (slot_step_[size_t(s)] == step_) continue;  // this step's row: kept
    if (slot_ref_[size_t(s)]) {
      slot_ref_[size_t(s)] = 0;
      continue;
    }
    return s;
  }
  throw std::invalid_argument("value table " + path_ + ": one step reads more distinct rows than the cache's " +
                              std::to_string(capacity_) + " slots; raise the cache size");
}

void RowCache::submit(const int64_t* rows, int64_t n) {
  if (io_->pending) {  // the previous step's reads were never waited for
    std::vector<int64_t> unused(pending_rows_.size());
    complete(unused.data());
  }
  ++step_;
  pending_rows_.assign(rows, rows + n);
  pending_slots_.resize(size_t(n));
  for (int64_t i = 0; i < n; ++i)
    if (rows[i] < 0 || rows[i] >= info_.rows)
      throw std::invalid_argument("value table " + path_ + ": row " + std::to_string(rows[i]) + " outside [0, " +
                                  std::to_string(info_.rows) + ")");
  auto& misses = io_->misses;
  misses.clear();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t row = rows[i];
    ++stats_.lookups;
    int64_t s = find(row);
    if (s >= 0) {
      ++stats_.hits;
    } else {
      try {
        s = evict_slot();
      } catch (...) {  // the slots given to this step's misses hold nothing: forget them
        for (const auto& [r, slot] : misses) {
          erase(r);
          slot_row_[size_t(slot)] = -1;
        }
        misses.clear();
        throw;
      }
      if (slot_row_[size_t(s)] >= 0) erase(slot_row_[size_t(s)]);
      insert(row, s);
      slot_row_[size_t(s)] = row;
      misses.emplace_back(row, s);
      ++stats_.misses;
    }
    slot_ref_[size_t(s)] = 1;
    slot_step_[size_t(s)] = step_;
    pending_slots_[size_t(i)] = s;
  }

  // One read per run of rows that starts on the page where the run so far ends. Direct reads cover whole
  // pages (offset and length multiples of 4 KiB), and runs whose pages touch are merged.
  std::sort(misses.begin(), misses.end());
  auto& spans = io_->spans;
  spans.clear();
  for (size_t k = 0; k < misses.size(); ++k) {
    const int64_t off = info_.data_offset + misses[k].first * info_.row_bytes, end = off + info_.row_bytes;
    if (!spans.empty()) {
      Span& last = spans.back();
      const int64_t last_end = last.offset + last.length;
      const bool joins = direct_ ? off < last_end + kPage && last.length < kMaxDirectRead
                                 : off >= last_end && off / kPage == (last_end - 1) / kPage;
      if (joins) {
        last.need = end - last.offset;
        last.length = direct_ ? std::max(last.length, (end - last.offset + kPage - 1) / kPage * kPage) : last.need;
        ++last.count;
        continue;
      }
    }
    const int64_t start = direct_ ? off / kPage * kPage : off;
    const int64_t length = direct_ ? (end - start + kPage - 1) / kPage * kPage : info_.row_bytes;
    spans.push_back(Span{start, length, 0, end - start, k, 1});
  }
  int64_t staged = 0;
  for (auto& sp : spans) {
    sp.at = staged;
    staged += sp.length;
  }
  io_->staging.resize(size_t(staged));
  stats_.reads += int64_t(spans.size());
  stats_.bytes_read += staged;
  io_->next = io_->done = 0;
  io_->pending = true;
  if (io_->uring) {  // the first wave now; complete() keeps the queue full
    while (io_->next < spans.size() && io_->next < io_->depth) {
      const Span& sp = spans[io_->next];
      io_uring_sqe* sqe = io_uring_get_sqe(&io_->ring);
      io_uring_prep_read(sqe, fd_, io_->staging.data() + sp.at, unsigned(sp.length), uint64_t(sp.offset));
      io_uring_sqe_set_data64(sqe, io_->next);
      ++io_->next;
    }
    if (io_->next > 0) io_uring_submit(&io_->ring);
  }
}

void RowCache::complete(int64_t* slots) {
  auto& spans = io_->spans;
  std::string error;
  auto read_failed = [&](const Span& sp, long res) {
    if (error.empty())
      error = "value table " + path_ + ": reading " + std::to_string(sp.length) + " bytes at offset " +
              std::to_string(sp.offset) + " failed: " +
              (res < 0 ? std::string(std::strerror(int(-res))) : "short read (the file shrank?)");
  };
  if (io_->pending && io_->uring) {
    while (io_->done < spans.size()) {
      io_uring_cqe* cqe = nullptr;
      const int rc = io_uring_wait_cqe(&io_->ring, &cqe);
      if (rc == -EINTR) continue;
      if (rc != 0) throw std::runtime_error("value table " + path_ + ": io_uring: " + std::strerror(-rc));
      const Span& sp = spans[size_t(io_uring_cqe_get_data64(cqe))];
      if (cqe->res < int(sp.need)) read_failed(sp, cqe->res);
      io_uring_cqe_seen(&io_->ring, cqe);
      ++io_->done;
      if (io_->next < spans.size()) {
        const Span& nx = spans[io_->next];
        io_uring_sqe* sqe = io_uring_get_sqe(&io_->ring);
        io_uring_prep_read(sqe, fd_, io_->staging.data() + nx.at, unsigned(nx.length), uint64_t(nx.offset));
        io_uring_sqe_set_data64(sqe, io_->next);
        ++io_->next;
        io_uring_submit(&io_->ring);
      }
    }
  } else if (io_->pending) {
    for (const Span& sp : spans) {
      int64_t got = 0;  // a direct read continues at a page boundary: it only ends short at the end of the file
      while (got < sp.need) {
        const ssize_t r = ::pread(fd_, io_->staging.data() + sp.at + got, size_t(sp.length - got), sp.offset + got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0 || (direct_ && got + r < sp.need && r % kPage != 0)) {
          read_failed(sp, r < 0 ? -errno : 0);
          break;
        }
        got += r;
      }
    }
  }
  io_->pending = false;
  if (!error.empty()) {
    for (const auto& [row, slot] : io_->misses) {  // those slots hold nothing valid
      erase(row);
      slot_row_[size_t(slot)] = -1;
    }
    throw std::runtime_error(error);
  }
  // Scatter each missed row from its span into its slot: values, and the int8 row scale beside them.
  for (const Span& sp : spans) {
    for (size_t k = sp.first; k < sp.first + sp.count; ++k) {
      const auto [row, slot] = io_->misses[k];
      const uint8_t* src = io_->staging.data() + sp.at + (info_.data_offset + row * info_.row_bytes - sp.offset);
      std::memcpy(data_.get() + slot * value_bytes_, src, size_t(value_bytes_));
      if (info_.format == TableFormat::kInt8) std::memcpy(&scales_[size_t(slot)], src + info_.dv, 4);
    }
  }
  std::copy(pending_slots_.begin(), pending_slots_.end(), slots);
}

}  // namespace ultramem::kernels
