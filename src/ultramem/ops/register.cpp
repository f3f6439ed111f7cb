// Registers the ops for the PyTorch dispatcher, so Python can use them after
// torch.ops.load_library("libultramem_ops.so") as torch.ops.ultramem.<name>.
#include <torch/library.h>

#include "ultramem/ops/block_decode.h"
#include "ultramem/ops/engram_rows.h"
#include "ultramem/ops/ops.h"
#include "ultramem/ops/engram_decode.h"
#include "ultramem/ops/ultramem_decode.h"

TORCH_LIBRARY(ultramem, m) {
  m.def("tdqkr(Tensor s_row, Tensor s_col, Tensor cores, Tensor u, Tensor v, int m_first, int m,"
        " int m_neg=0) -> (Tensor scores, Tensor index)",
        &ultramem::ops::tdqkr);
  m.def("tdqkr_exact(Tensor s_row, Tensor s_col, Tensor cores, int m) -> (Tensor scores, Tensor index)",
        &ultramem::ops::tdqkr_exact);
  // The layer's fused no-grad forward (ops/ultramem_decode.h) and the key preparation it needs.
  m.def("fold_filter_keys(Tensor kn_row, Tensor kn_col, Tensor u, Tensor v, bool per_rank=False) -> (Tensor kn, Tensor kf)",
        &ultramem::ops::fold_filter_keys_op);
  m.def("ultramem_decode(Tensor x, Tensor wq, Tensor q_scale, Tensor cores, Tensor kn, Tensor kf, Tensor values,"
        " Tensor? values_scale, Tensor perm, Tensor wo, int m, int m_first, int m_neg=0, bool rms_norm=True,"
        " Tensor? kn_scale=None, Tensor? kf_scale=None, int filter_rank=0, Tensor? wp=None, Tensor? pre_values=None)"
        " -> Tensor",
        &ultramem::ops::ultramem_decode_op);
  m.def("ultramem_decode_retrieval(Tensor x, Tensor wq, Tensor q_scale, Tensor cores, Tensor kn, Tensor kf,"
        " Tensor values, Tensor? values_scale, Tensor perm, Tensor wo, int m, int m_first, int m_neg=0,"
        " bool rms_norm=True, Tensor? kn_scale=None, Tensor? kf_scale=None, int filter_rank=0, Tensor? wp=None,"
        " Tensor? pre_values=None) -> (Tensor out, Tensor scores, Tensor index)",
        &ultramem::ops::ultramem_decode_retrieval_op);
  // Engram's fused no-grad forward (ops/engram_decode.h); conv_state is updated in place.
  m.def("engram_decode(Tensor u, Tensor rows, Tensor values, Tensor? values_scale, Tensor wk, Tensor wv,"
        " Tensor gate_u, Tensor gate_k, Tensor conv_norm, Tensor conv, Tensor(a!) conv_state) -> Tensor",
        &ultramem::ops::engram_decode_op);
  // The layer's IVE permutation from its seed (or Feistel key), as nn::UltraMem builds it.
  m.def("ive_permutation(int slots, int seed, int key=0) -> Tensor", &ultramem::ops::ive_permutation_op);
  // Engram's addressing (ops/engram_rows.h): the rows each position reads, and the tables' prime sizes.
  m.def("engram_rows(Tensor tokens, Tensor? history, int heads, int rows, int seed) -> Tensor",
        &ultramem::ops::engram_rows_op);
  m.def("engram_table_sizes(int heads, int rows) -> Tensor", &ultramem::ops::engram_table_sizes_op);
  // The transformer block's no-grad ops (ops/block_decode.h).
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &ultramem::ops::rms_norm);
  // (the float-tensor overloads; compact matrices are the C++ API's ops::Matrix)
  using T = at::Tensor;
  m.def("linear_nt(Tensor x, Tensor w) -> Tensor", static_cast<T (*)(const T&, const T&)>(&ultramem::ops::linear_nt));
  m.def("swiglu_forward(Tensor x, Tensor w_in, Tensor w_out) -> Tensor",
        static_cast<T (*)(const T&, const T&, const T&)>(&ultramem::ops::swiglu_forward));
  m.def("attention_decode(Tensor x, Tensor wqkv, Tensor wo, Tensor cos, Tensor sin, Tensor(a!) cache_k,"
        " Tensor(b!) cache_v, int pos) -> Tensor",
        static_cast<T (*)(const T&, const T&, const T&, const T&, const T&, T&, T&, int64_t)>(
            &ultramem::ops::attention_decode));
  m.def("pooled_lookup(Tensor values, Tensor index, Tensor scores, Tensor perm, int E,"
        " bool sparse_grad=False) -> Tensor",
        &ultramem::ops::pooled_lookup);
}
