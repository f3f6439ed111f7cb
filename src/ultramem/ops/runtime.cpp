#include "ultramem/ops/runtime.h"

#include <ATen/Parallel.h>
#include <omp.h>

#include <dlfcn.h>

#include <atomic>
#include <thread>

#include "ultramem/kernels/isa.h"

namespace ultramem {

int default_threads() {
  const unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(n);
}

void set_threads(int n) {
  if (n <= 0) n = default_threads();
  at::set_num_threads(n);
  omp_set_num_threads(n);
  // Debian's libtorch runs matmuls on OpenBLAS, whose own thread pool ignores the two calls above.
  using SetThreads = void (*)(int);
  if (auto f = reinterpret_cast<SetThreads>(::dlsym(RTLD_DEFAULT, "openblas_set_num_threads"))) f(n);
}

namespace {
std::atomic<bool> g_batch_invariant{false};
}  // namespace

void set_batch_invariant(bool on) { g_batch_invariant.store(on, std::memory_order_relaxed); }
bool batch_invariant() { return g_batch_invariant.load(std::memory_order_relaxed); }

const char* kernel_isa() { return kernels::active_isa(); }

}  // namespace ultramem
