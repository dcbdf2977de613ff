// The row kernels for the compiler's default target (SSE2 on x86-64, NEON on aarch64): correct everywhere,
// and the fallback when the CPU has no AVX2 or ATEN_CPU_CAPABILITY=default asks torch for the baseline.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "cpu_kernels.h"

#define AEM_ISA_NAMESPACE baseline
#define AEM_ISA_NAME "baseline"
#define AEM_ISA_HAS_FMA 0
#define AEM_ISA_VECTOR_BYTES 16  // SSE2 / NEON
#include "row_kernels_impl.h"
