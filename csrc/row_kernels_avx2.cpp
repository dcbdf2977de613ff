// The row kernels compiled for AVX2 + FMA (x86-64 only), chosen at run time by active_kernels().
//
// Why a target pragma instead of -mavx2 for the whole build: the wheel must run on any x86-64 CPU, so only
// this translation unit may contain AVX2 code, and only functions that are called after the CPU check. The
// standard headers are included BEFORE the pragma, so any inline function they define is compiled for the
// default target (the linker may keep one copy of it for the whole program); everything defined after the
// pragma lives in an anonymous namespace (internal linkage) except avx2::kernel_table().
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "cpu_kernels.h"

#if defined(AEM_KERNELS_HAVE_AVX2_VARIANT)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

#define AEM_ISA_NAMESPACE avx2
#define AEM_ISA_NAME "avx2"
#define AEM_ISA_HAS_FMA 1
#define AEM_ISA_VECTOR_BYTES 32
#include "row_kernels_impl.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // AEM_KERNELS_HAVE_AVX2_VARIANT
