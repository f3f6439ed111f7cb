// Private to the ops folder: argument checks that name the op and the argument in their message.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <string>

namespace ultramem::ops::detail {

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + std::to_string(t.size(d));
  return s + "]";
}

// Checks device, dtype and rank of `t`; `what` is e.g. "ultramem::tdqkr: s_row".
inline void check_tensor(const at::Tensor& t, const char* what, int64_t dim,
                         std::initializer_list<at::ScalarType> dtypes) {
  TORCH_CHECK(t.defined(), what, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), what, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(!t.is_sparse(), what, " must be a dense (strided) tensor");
  bool ok = false;
  for (auto d : dtypes) ok = ok || t.scalar_type() == d;
  if (!ok) {  // the message is built only on failure: the decode ops check every call
    std::string names;
    for (auto d : dtypes) names += (names.empty() ? "" : " or ") + std::string(c10::toString(d));
    TORCH_CHECK(false, what, " must have dtype ", names, ", got ", t.scalar_type());
  }
  TORCH_CHECK(t.dim() == dim, what, " must have ", dim, " dimensions, got shape ", shape_str(t));
}

// Checks that `t` has exactly the expected sizes.
inline void check_sizes(const at::Tensor& t, const char* what, std::initializer_list<int64_t> sizes,
                        const char* expected) {
  bool ok = t.dim() == static_cast<int64_t>(sizes.size());
  int64_t d = 0;
  for (int64_t s : sizes) ok = ok && t.size(d++) == s;
  TORCH_CHECK(ok, what, " must have shape ", expected, ", got ", shape_str(t));
}

}  // namespace ultramem::ops::detail
