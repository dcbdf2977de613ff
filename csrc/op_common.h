// Input checks and layout helpers shared by the torch-facing ops. The user-facing validation lives in
// aem_kernels/_validation.py; these checks guard the C++ entry points (torch.ops.aem_kernels.*) against
// inputs that would make a kernel read or write out of bounds, and name the tensor and the property.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <cstdint>

#include "cpu_kernels.h"

namespace aem_kernels {
namespace cpu {

inline LogitDtype logit_dtype(const at::Tensor& logits) {
  switch (logits.scalar_type()) {
    case at::kFloat: return LogitDtype::kFloat;
    case at::kBFloat16: return LogitDtype::kBFloat16;
    case at::kHalf: return LogitDtype::kHalf;
    case at::kDouble: return LogitDtype::kDouble;
    default:
      TORCH_CHECK_TYPE(false, "aem_kernels: logits must be float32, bfloat16, float16 or float64, got ",
                       logits.scalar_type());
  }
  return LogitDtype::kFloat;  // unreachable
}

// fp32 accumulation and outputs, fp64 for fp64 logits (matches aem_kernels._layout.compute_dtype).
inline at::ScalarType compute_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// [B, T, V] CPU logits with a unit vocab stride; returns the row layout.
inline RowLayout check_rows3d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "aem_kernels: ", name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.dim() == 3, "aem_kernels: ", name, " must be 3-d [B, T, V], got shape ", t.sizes());
  TORCH_CHECK(t.size(2) >= 1, "aem_kernels: ", name, " must have a vocabulary dimension V >= 1, got shape ",
              t.sizes());
  TORCH_CHECK(t.size(2) == 1 || t.stride(2) == 1, "aem_kernels: ", name,
              " must have a unit stride along the vocabulary (last) dimension, got strides ", t.strides());
  return RowLayout{t.size(1) > 0 ? t.size(1) : 1, t.size(2), t.stride(0), t.stride(1)};
}

inline double check_temperature(double temperature) {
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, "aem_kernels: temperature must be a finite float > 0, got ",
              temperature);
  return temperature;
}

// Labels as a contiguous int64 [rows] tensor whose values were checked to lie in [0, V) or equal ignore_index
// (a label outside the row would be an out-of-bounds read).
inline at::Tensor checked_labels(const at::Tensor& labels, int64_t rows, int64_t vocab, int64_t ignore_index) {
  TORCH_CHECK(labels.device().is_cpu(), "aem_kernels: labels must be a CPU tensor, got one on ", labels.device());
  TORCH_CHECK_TYPE(at::isIntegralType(labels.scalar_type(), /*includeBool=*/false),
                   "aem_kernels: labels must be an integer tensor, got ", labels.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == rows, "aem_kernels: labels must have shape [", rows,
              "] (one per row of logits), got ", labels.sizes());
  at::Tensor out = labels.to(at::kLong).contiguous();
  const int64_t* y = out.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(y[r] == ignore_index || (y[r] >= 0 && y[r] < vocab), "aem_kernels: labels must lie in [0, ",
                vocab, ") or equal ignore_index=", ignore_index, "; labels[", r, "] = ", y[r]);
  }
  return out;
}

// A per-row fp32/fp64 vector ([rows], any float dtype) as a contiguous tensor of the compute dtype.
inline at::Tensor checked_row_vector(const at::Tensor& t, const char* name, int64_t rows, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), "aem_kernels: ", name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), "aem_kernels: ", name,
                   " must be a floating-point tensor, got ", t.scalar_type());
  TORCH_CHECK(t.numel() == rows, "aem_kernels: ", name, " must have one value per row of logits (", rows,
              "), got shape ", t.sizes());
  return t.reshape({rows}).to(dtype).contiguous();
}

// The forward's per-row state ([rows, 2] of (m, log d), any float dtype) as a contiguous tensor of the
// compute dtype.
inline at::Tensor checked_row_state(const at::Tensor& t, const char* name, int64_t rows, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), "aem_kernels: ", name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), "aem_kernels: ", name,
                   " must be a floating-point tensor, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == 2, "aem_kernels: ", name,
              " must be the [", rows, ", 2] state the forward returned, got shape ", t.sizes());
  return t.to(dtype).contiguous();
}

// Rows of ~64 KiB per task at least: parallel_for's grain is in rows.
inline int64_t row_grain(int64_t vocab) {
  const int64_t elements = int64_t(1) << 14;
  return vocab >= elements ? 1 : elements / vocab;
}

}  // namespace cpu
}  // namespace aem_kernels
