// Process-wide runtime settings.
#pragma once

namespace ultramem {

// Number of cores of this machine (std::thread::hardware_concurrency, at least 1).
int default_threads();

// Sets libtorch's intra-op threads, the OpenMP threads of our kernels and OpenBLAS's threads. n <= 0 means default_threads().
// Debian's libtorch starts with one thread whatever the core count, so every entry point calls this.
void set_threads(int n);

// The kernel build this process runs: "avx2" or "generic" (ULTRAMEM_ISA=generic forces the latter).
const char* kernel_isa();

}  // namespace ultramem
