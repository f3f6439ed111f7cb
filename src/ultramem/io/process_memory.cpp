#include "ultramem/io/process_memory.h"

#include <sys/resource.h>

#include <cstdlib>
#include <fstream>
#include <string>

namespace ultramem::io {
namespace {

// The "Key: N kB" line of a /proc file, in bytes.
int64_t proc_kib_field(const char* file, const std::string& key) {
  std::ifstream f(file);
  std::string line;
  while (std::getline(f, line))
    if (line.rfind(key, 0) == 0) return int64_t(std::atoll(line.c_str() + key.size())) * 1024;
  return 0;
}

}  // namespace

int64_t resident_bytes() { return proc_kib_field("/proc/self/status", "VmRSS:"); }

int64_t peak_resident_bytes() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return int64_t(u.ru_maxrss) * 1024;  // KiB on Linux
}

int64_t resident_high_water_bytes() { return proc_kib_field("/proc/self/status", "VmHWM:"); }

bool reset_resident_high_water() {
  std::ofstream f("/proc/self/clear_refs");
  f << "5";
  f.flush();
  return bool(f);
}

int64_t storage_read_bytes() {
  std::ifstream f("/proc/self/io");
  std::string key;
  int64_t value = 0;
  while (f >> key >> value)
    if (key == "read_bytes:") return value;
  return -1;
}

int64_t available_bytes() { return proc_kib_field("/proc/meminfo", "MemAvailable:"); }

int64_t total_memory_bytes() {
  return proc_kib_field("/proc/meminfo", "MemTotal:") + proc_kib_field("/proc/meminfo", "SwapTotal:");
}

}  // namespace ultramem::io
