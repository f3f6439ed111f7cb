// Memory for large, randomly read tables (value tables, IVE permutations): 2 MiB-aligned and, for
// blocks of at least one huge page, advised to use transparent huge pages (madvise(MADV_HUGEPAGE),
// which is what THP mode "madvise" needs). A random row read then costs no page walk per row on a
// multi-GiB table (docs/performance.md, sections 1 and 7.1). Where huge pages are unavailable the
// memory is ordinary and works the same, only slower to gather from.
#pragma once
#include <cstddef>

namespace ultramem::kernels {

// Allocates `bytes` (> 0) aligned to 2 MiB; pages are not touched. Returns nullptr when out of memory.
void* alloc_huge_pages(size_t bytes);
// Frees memory from alloc_huge_pages (nullptr is ignored).
void free_huge_pages(void* p);

// Whether madvise(MADV_HUGEPAGE) succeeded on the last allocation of at least 2 MiB (diagnostics).
bool last_huge_page_advice_ok();

}  // namespace ultramem::kernels
