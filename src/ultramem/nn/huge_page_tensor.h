// Tensors on transparent huge pages (kernels/huge_pages.h) for large, randomly read tables: memory
// layers' value tables and IVE permutations. Header-only so that every target compiling a memory
// layer gets it without another source file.
#pragma once
#include <ATen/Functions.h>

#include <new>

#include "ultramem/kernels/huge_pages.h"

namespace ultramem::nn::detail {

// An uninitialised contiguous CPU tensor; tables of at least 2 MiB are placed on a 2 MiB-aligned
// allocation advised for huge pages (pages are not touched here), smaller ones are ordinary.
inline at::Tensor empty_on_huge_pages(at::IntArrayRef sizes, at::ScalarType dtype) {
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const size_t bytes = size_t(numel) * c10::elementSize(dtype);
  if (bytes < (size_t(2) << 20)) return at::empty(sizes, at::TensorOptions().dtype(dtype));
  void* p = kernels::alloc_huge_pages(bytes);
  if (p == nullptr) throw std::bad_alloc();
  return at::from_blob(p, sizes, [](void* q) { kernels::free_huge_pages(q); }, at::TensorOptions().dtype(dtype));
}

// A contiguous copy of `t` on huge pages (see empty_on_huge_pages).
inline at::Tensor copy_to_huge_pages(const at::Tensor& t) {
  at::Tensor out = empty_on_huge_pages(t.sizes(), t.scalar_type());
  out.copy_(t);
  return out;
}

}  // namespace ultramem::nn::detail
