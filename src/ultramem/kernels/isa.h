// Which kernel build runs on this CPU. Set ULTRAMEM_ISA=generic to force the portable build.
#pragma once

namespace ultramem::kernels {
// "avx2" or "generic".
const char* active_isa();
}  // namespace ultramem::kernels
