// 2 MiB-aligned allocations advised to use transparent huge pages (see huge_pages.h).
#include "ultramem/kernels/huge_pages.h"

#include <atomic>
#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace ultramem::kernels {
namespace {
constexpr size_t kHugePage = size_t(2) << 20;
std::atomic<bool> g_advice_ok{false};
}  // namespace

void* alloc_huge_pages(size_t bytes) {
  if (bytes == 0) return nullptr;
  const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  void* p = nullptr;
  if (::posix_memalign(&p, kHugePage, rounded) != 0) return nullptr;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (rounded >= kHugePage) g_advice_ok = ::madvise(p, rounded, MADV_HUGEPAGE) == 0;
#endif
  return p;
}

void free_huge_pages(void* p) { std::free(p); }

bool last_huge_page_advice_ok() { return g_advice_ok; }

}  // namespace ultramem::kernels
