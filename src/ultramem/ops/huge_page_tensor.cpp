#include "ultramem/ops/huge_page_tensor.h"

#include <ATen/Functions.h>

#include <new>

#include "ultramem/kernels/huge_pages.h"

namespace ultramem::ops::detail {

at::Tensor empty_on_huge_pages(at::IntArrayRef sizes, at::ScalarType dtype) {
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const size_t bytes = size_t(numel) * c10::elementSize(dtype);
  if (bytes < (size_t(2) << 20)) return at::empty(sizes, at::TensorOptions().dtype(dtype));
  void* p = kernels::alloc_huge_pages(bytes);
  if (p == nullptr) throw std::bad_alloc();
  return at::from_blob(p, sizes, [](void* q) { kernels::free_huge_pages(q); }, at::TensorOptions().dtype(dtype));
}

at::Tensor copy_to_huge_pages(const at::Tensor& t) {
  at::Tensor out = empty_on_huge_pages(t.sizes(), t.scalar_type());
  out.copy_(t);
  return out;
}

}  // namespace ultramem::ops::detail
