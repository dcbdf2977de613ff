// torch.ops.aem_kernels.segment_sum: per-response sums of a per-token quantity (AEM_SPEC eq. 3, 3'), the
// reduction behind response surprisal S_r and response entropy. Deterministic: tokens are added in index
// order into an fp64 accumulator (then rounded once to the values' dtype), whatever the thread count.
// A packed batch has ~1e4 tokens, so the serial O(N) loop costs microseconds next to the logits pass.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include <vector>

#include "op_common.h"

namespace aem_kernels {
namespace cpu {

// out[r] = sum_{t : segment_ids[t] == r} values[t]; ids of -1 (untrained tokens) are dropped.
at::Tensor segment_sum(const at::Tensor& values, const at::Tensor& segment_ids, int64_t num_segments) {
  TORCH_CHECK(values.device().is_cpu() && segment_ids.device().is_cpu(),
              "aem_kernels: values and segment_ids must be CPU tensors, got ", values.device(), " and ",
              segment_ids.device());
  TORCH_CHECK_TYPE(at::isFloatingType(values.scalar_type()), "aem_kernels: values must be a floating-point tensor, got ",
                   values.scalar_type());
  TORCH_CHECK_TYPE(at::isIntegralType(segment_ids.scalar_type(), /*includeBool=*/false),
                   "aem_kernels: segment_ids must be an integer tensor, got ", segment_ids.scalar_type());
  TORCH_CHECK(values.numel() == segment_ids.numel(), "aem_kernels: segment_ids must have one id per value (",
              values.numel(), "), got shape ", segment_ids.sizes());
  TORCH_CHECK(num_segments >= 0, "aem_kernels: num_segments must be >= 0, got ", num_segments);
  const at::Tensor ids = segment_ids.reshape({-1}).to(at::kLong).contiguous();
  const at::Tensor vals = values.reshape({-1}).to(at::kDouble).contiguous();
  const int64_t* id = ids.const_data_ptr<int64_t>();
  const double* v = vals.const_data_ptr<double>();
  std::vector<double> sums(static_cast<size_t>(num_segments), 0.0);
  for (int64_t t = 0; t < ids.numel(); ++t) {
    TORCH_CHECK(id[t] >= -1 && id[t] < num_segments, "aem_kernels: segment_ids must lie in [-1, ", num_segments,
                "); segment_ids[", t, "] = ", id[t]);
    if (id[t] >= 0) sums[static_cast<size_t>(id[t])] += v[t];
  }
  at::Tensor out = at::empty({num_segments}, values.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "aem_kernels_segment_sum", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    for (int64_t r = 0; r < num_segments; ++r) o[r] = static_cast<scalar_t>(sums[static_cast<size_t>(r)]);
  });
  return out;
}

}  // namespace cpu
}  // namespace aem_kernels
