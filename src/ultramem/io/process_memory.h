// This process's memory, from the kernel: the one reader the commands and benchmarks share.
#pragma once
#include <cstdint>

namespace ultramem::io {

int64_t resident_bytes();       // VmRSS now (/proc/self/status); 0 when unknown
int64_t peak_resident_bytes();  // the largest RSS so far (getrusage ru_maxrss)
int64_t available_bytes();      // MemAvailable of the machine (/proc/meminfo); 0 when unknown
int64_t total_memory_bytes();   // MemTotal + SwapTotal of the machine (/proc/meminfo); 0 when unknown

}  // namespace ultramem::io
