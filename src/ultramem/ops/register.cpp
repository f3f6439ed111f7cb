// Registers the ops for the PyTorch dispatcher, so Python can use them after
// torch.ops.load_library("libultramem_ops.so") as torch.ops.ultramem.<name>.
#include <torch/library.h>

#include "ultramem/ops/ops.h"

TORCH_LIBRARY(ultramem, m) {
  m.def("tdqkr(Tensor s_row, Tensor s_col, Tensor cores, Tensor u, Tensor v, int m_first, int m,"
        " int m_neg=0) -> (Tensor scores, Tensor index)",
        &ultramem::ops::tdqkr);
  m.def("tdqkr_exact(Tensor s_row, Tensor s_col, Tensor cores, int m) -> (Tensor scores, Tensor index)",
        &ultramem::ops::tdqkr_exact);
  m.def("pooled_lookup(Tensor values, Tensor index, Tensor scores, Tensor perm, int E,"
        " bool sparse_grad=False) -> Tensor",
        &ultramem::ops::pooled_lookup);
}
