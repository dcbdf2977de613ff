// torch.ops.aem_kernels.logprobs_entropy_fwd: token log-probs, entropies (AEM_SPEC eq. 1-2) and the per-row
// softmax state of [B, T, V] CPU logits in one read of each row (the row kernels are in row_kernels_impl.h).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <tuple>

#include "op_common.h"

namespace aem_kernels {
namespace cpu {

// Returns (logprobs [B*T] or an empty [0] tensor when labels is None, entropy [B*T] or an empty [0] tensor when
// with_entropy is false, state [B*T, 2] = (row max of the logits, log d) for the backward), fp32 (fp64 for fp64
// logits). with_entropy = false runs the kernels that skip the entropy's sum; the log-probs and the state are
// bit-identical. Rows whose label is ignore_index give 0 in all outputs and are not read.
std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_entropy_fwd(const at::Tensor& logits,
                                                                    const c10::optional<at::Tensor>& labels,
                                                                    double temperature, int64_t ignore_index,
                                                                    bool with_entropy) {
  const RowLayout layout = check_rows3d(logits, "logits");
  const LogitDtype dtype = logit_dtype(logits);
  check_temperature(temperature);
  const int64_t rows = logits.size(0) * logits.size(1);
  const auto options = logits.options().dtype(compute_dtype(logits));
  at::Tensor labels64;
  if (labels.has_value()) labels64 = checked_labels(*labels, rows, layout.vocab, ignore_index);

  at::Tensor logprobs = at::empty({labels.has_value() ? rows : 0}, options);
  at::Tensor entropy = at::empty({with_entropy ? rows : 0}, options);
  at::Tensor state = at::empty({rows, 2}, options);
  const ForwardArgs args{logits.const_data_ptr(),
                         layout,
                         labels.has_value() ? labels64.const_data_ptr<int64_t>() : nullptr,
                         ignore_index,
                         temperature,
                         1.0 / temperature,
                         labels.has_value() ? logprobs.data_ptr() : nullptr,
                         with_entropy ? entropy.data_ptr() : nullptr,
                         state.data_ptr()};
  const RowKernelTable& kernels = active_kernels();
  const ForwardRowsFn kernel =
      (with_entropy ? kernels.forward : kernels.forward_without_entropy)[static_cast<int>(dtype)];
  // Each row is reduced by one thread in a fixed order: the result does not depend on the thread count.
  at::parallel_for(0, rows, row_grain(layout.vocab),
                   [&](int64_t begin, int64_t end) { kernel(args, begin, end); });
  return {logprobs, entropy, state};
}

}  // namespace cpu
}  // namespace aem_kernels
