// Plain-pointer interface between the torch-facing ops (logprobs_entropy_fwd.cpp, logprobs_entropy_bwd.cpp)
// and the row kernels (row_kernels_impl.h), which are compiled once per instruction set:
//   row_kernels_baseline.cpp  the compiler's default target (SSE2 on x86-64, NEON on aarch64)
//   row_kernels_avx2.cpp      AVX2 + FMA, selected at run time when the CPU and torch allow it
// This header includes no torch header on purpose: the AVX2 translation unit must not instantiate any inline
// function that the rest of the program could also use (see row_kernels_avx2.cpp).
#pragma once

#include <cstdint>

namespace aem_kernels {
namespace cpu {

// The logits' element type; the kernels compute in fp32 (fp64 for kDouble).
enum class LogitDtype : int { kFloat = 0, kBFloat16 = 1, kHalf = 2, kDouble = 3 };
constexpr int kNumLogitDtypes = 4;

// Rows are r = 0 .. B*T-1; row r starts at (r / T) * stride_b + (r % T) * stride_t elements from the base
// pointer and holds V contiguous elements (see aem_kernels/_layout.py).
struct RowLayout {
  int64_t rows_per_batch;  // T
  int64_t vocab;           // V
  int64_t stride_b;
  int64_t stride_t;

  int64_t offset(int64_t row) const {
    return (row / rows_per_batch) * stride_b + (row % rows_per_batch) * stride_t;
  }
};

// Forward (AEM_SPEC eq. 1-2). Outputs are float* (double* for kDouble); logprobs is null when labels are;
// entropy is not written (and may be null) by the forward_without_entropy kernels.
// state is [B*T, 2] row-major: (m, log d) per row, m the row max of the logits and d = sum exp((x - m) / tau),
// what the backward needs (kept apart rather than folded into lse = m / tau + log d; see row_kernels_impl.h).
struct ForwardArgs {
  const void* logits;
  RowLayout layout;
  const int64_t* labels;  // [B*T] or null (entropy only); values in [0, V) or ignore_index (checked before)
  int64_t ignore_index;
  double temperature;      // the per-row epilogue divides by it in double
  double inv_temperature;  // the per-element shifts are scaled by it in the accumulation type
  void* logprobs;
  void* entropy;
  void* state;
};

// Backward (AEM_SPEC section 6). state ([B*T, 2], as the forward wrote it), entropy and grad_* are float*
// (double* for kDouble); either grad may be null. entropy is read only when grad_entropy is given.
// grad_out has the logits' dtype and may be the logits themselves (same pointer and layout: in place).
struct BackwardArgs {
  const void* logits;
  RowLayout layout;
  void* grad_out;
  RowLayout grad_layout;
  const int64_t* labels;
  int64_t ignore_index;
  double inv_temperature;
  const void* state;
  const void* entropy;
  const void* grad_logprobs;
  const void* grad_entropy;
};

using ForwardRowsFn = void (*)(const ForwardArgs&, int64_t row_begin, int64_t row_end);
using BackwardRowsFn = void (*)(const BackwardArgs&, int64_t row_begin, int64_t row_end);

// One instruction set's kernels, indexed by LogitDtype. forward_without_entropy skips the entropy's sum
// t = sum exp(s) s (the same log-probs and state, bit for bit) for callers that do not use h.
struct RowKernelTable {
  const char* isa;
  ForwardRowsFn forward[kNumLogitDtypes];
  ForwardRowsFn forward_without_entropy[kNumLogitDtypes];
  BackwardRowsFn backward[kNumLogitDtypes];
};

namespace baseline {
const RowKernelTable& kernel_table();
}
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define AEM_KERNELS_HAVE_AVX2_VARIANT 1
namespace avx2 {
const RowKernelTable& kernel_table();
}
#endif

// The table the ops use: AVX2 when compiled in, supported by the CPU and allowed by torch's own CPU
// capability (ATEN_CPU_CAPABILITY=default turns it off), else the baseline. Defined in registration.cpp.
const RowKernelTable& active_kernels();
// Test hook: force "baseline", "avx2" or "auto"; returns false for a name this build or CPU cannot run.
bool select_kernels(const char* isa);

}  // namespace cpu
}  // namespace aem_kernels
