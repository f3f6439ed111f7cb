// Tensors on transparent huge pages (kernels/huge_pages.h) for large, randomly read tables: memory
// layers' value tables and IVE permutations.
#pragma once
#include <ATen/core/Tensor.h>

namespace ultramem::ops::detail {

// An uninitialised contiguous CPU tensor; tables of at least 2 MiB are placed on a 2 MiB-aligned
// allocation advised for huge pages (pages are not touched here), smaller ones are ordinary.
at::Tensor empty_on_huge_pages(at::IntArrayRef sizes, at::ScalarType dtype);

// A contiguous copy of `t` on huge pages (see empty_on_huge_pages).
at::Tensor copy_to_huge_pages(const at::Tensor& t);

}  // namespace ultramem::ops::detail
