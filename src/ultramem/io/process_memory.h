// This process's memory, from the kernel: the one reader the commands and benchmarks share.
#pragma once
#include <cstdint>

namespace ultramem::io {

int64_t resident_bytes();       // VmRSS now (/proc/self/status); 0 when unknown
int64_t peak_resident_bytes();  // the largest RSS so far (getrusage ru_maxrss)
// The largest RSS since the last reset_resident_high_water() (VmHWM); 0 when unknown.
int64_t resident_high_water_bytes();
// Starts a new high-water mark at the current RSS (/proc/self/clear_refs); false when the kernel refuses.
bool reset_resident_high_water();
// Bytes this process had fetched from storage so far (/proc/self/io read_bytes: page-cache hits are not
// counted); -1 when unknown.
int64_t storage_read_bytes();
int64_t available_bytes();      // MemAvailable of the machine (/proc/meminfo); 0 when unknown
int64_t total_memory_bytes();   // MemTotal + SwapTotal of the machine (/proc/meminfo); 0 when unknown

}  // namespace ultramem::io
