// Private to the kernels folder: the table of hot kernels that each ISA build provides, and the
// dispatcher that picks one at run time. The scalar references are compiled once (generic build).
#pragma once
#include "ultramem/kernels/pooled_lookup.h"
#include "ultramem/kernels/small_matmul.h"
#include "ultramem/kernels/tdqkr.h"

namespace ultramem::kernels {

template <typename T>
struct KernelTable {
  decltype(&tdqkr_filter<T>) tdqkr_filter;
  decltype(&tdqkr_rescore<T>) tdqkr_rescore;
  decltype(&tdqkr_forward<T>) tdqkr_forward;
  decltype(&tdqkr_backward<T>) tdqkr_backward;
  decltype(&tdqkr_exact<T>) tdqkr_exact;
  decltype(&pooled_lookup_forward<T>) pooled_lookup_forward;
  decltype(&pooled_lookup_forward_bf16<T>) pooled_lookup_forward_bf16;
  decltype(&pooled_lookup_forward_int8<T>) pooled_lookup_forward_int8;
  decltype(&pooled_lookup_backward_scores<T>) pooled_lookup_backward_scores;
  decltype(&pooled_lookup_backward_values<T>) pooled_lookup_backward_values;
  decltype(&matmul_rows<T>) matmul_rows;
  decltype(&matmul_rows_nt<T>) matmul_rows_nt;
  decltype(&gathered_dots<T>) gathered_dots;
  decltype(&matmul_rows_nt_q<T>) matmul_rows_nt_q;
  decltype(&gathered_dots_q<T>) gathered_dots_q;
  decltype(&attend_cached<T>) attend_cached;
  decltype(&kernels::matmul_rows_q8) matmul_rows_q8 = nullptr;  // float tables only
};

namespace generic {
template <typename T> void fill_tdqkr(KernelTable<T>& t);
template <typename T> void fill_pool(KernelTable<T>& t);
template <typename T> void fill_small_matmul(KernelTable<T>& t);
}  // namespace generic
namespace avx2 {
template <typename T> void fill_tdqkr(KernelTable<T>& t);
template <typename T> void fill_pool(KernelTable<T>& t);
template <typename T> void fill_small_matmul(KernelTable<T>& t);
}  // namespace avx2

}  // namespace ultramem::kernels
