// The one CPU-feature probe of the project: what the kernels' dispatcher, the bandwidth probes, the
// benchmarks and the tests ask of the processor.
#pragma once
#include <string>

namespace ultramem::kernels {

// True when the CPU runs AVX2 and FMA instructions (x86-64 only; false elsewhere).
bool cpu_has_avx2_fma();

// The processor's model name from /proc/cpuinfo ("" when unknown).
std::string cpu_model_name();

}  // namespace ultramem::kernels
