// Process-wide runtime settings.
#pragma once

namespace ultramem {

// Number of cores of this machine (std::thread::hardware_concurrency, at least 1).
int default_threads();

// Sets libtorch's intra-op threads, the OpenMP threads of our kernels and OpenBLAS's threads. n <= 0 means default_threads().
// Debian's libtorch starts with one thread whatever the core count, so every entry point calls this.
void set_threads(int n);

// Batch invariance of the no-grad decode ops (off by default). On: every dense product of the decode
// ops (attention, FFN, MoE experts, the memory layers' query, key scoring and output, the LM head) runs
// through the few-row kernels at every row count (float dots and FMA chains, or int8 integer dots, per
// row in a fixed order: a row's result does not depend on the other rows) instead of BLAS above 15
// rows (16 for int8), whose blocking may round a row differently with the batch around it. A sequence then decodes the same bits
// alone and in any batch: the server's promise (infer::Scheduler turns it on). Measured cost in
// docs/serving.md.
void set_batch_invariant(bool on);
bool batch_invariant();

// The kernel build this process runs: "avx2" or "generic" (ULTRAMEM_ISA=generic forces the latter).
const char* kernel_isa();

}  // namespace ultramem
