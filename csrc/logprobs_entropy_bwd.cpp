// torch.ops.aem_kernels.logprobs_entropy_bwd(_): the gradient of sum_t a_t l_t + b_t h_t with respect to the
// logits (AEM_SPEC section 6) in one read of each row and one write, optionally into the logits themselves.
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>

#include "op_common.h"

namespace aem_kernels {
namespace cpu {

namespace {

// Memory span [lo, hi) in bytes of a strided tensor (numel > 0).
std::pair<uintptr_t, uintptr_t> byte_span(const at::Tensor& t) {
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  const auto lo = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  return {lo, lo + static_cast<uintptr_t>(last + 1) * t.element_size()};
}

// grad_out must be the logits themselves (in place: same pointer, same strides) or not overlap them at all;
// a partial overlap would let one row's write corrupt another row before it is read.
void check_aliasing(const at::Tensor& logits, const at::Tensor& grad_out) {
  if (logits.numel() == 0 || !logits.storage().is_alias_of(grad_out.storage())) return;
  if (logits.const_data_ptr() == grad_out.const_data_ptr() && logits.strides() == grad_out.strides()) return;
  const auto a = byte_span(logits), b = byte_span(grad_out);
  TORCH_CHECK(a.second <= b.first || b.second <= a.first,
              "aem_kernels: grad_out must either be the logits themselves (in place, same strides) or not "
              "overlap them; got a partial overlap");
}

}  // namespace

void logprobs_entropy_bwd_(const at::Tensor& logits, const c10::optional<at::Tensor>& labels,
                           const at::Tensor& state, const at::Tensor& entropy,
                           const c10::optional<at::Tensor>& grad_logprobs,
                           const c10::optional<at::Tensor>& grad_entropy, double temperature, int64_t ignore_index,
                           const at::Tensor& grad_out) {
  const RowLayout layout = check_rows3d(logits, "logits");
  const RowLayout grad_layout = check_rows3d(grad_out, "grad_out");
  const LogitDtype dtype = logit_dtype(logits);
  TORCH_CHECK(grad_out.sizes() == logits.sizes(), "aem_kernels: grad_out must have the logits' shape ",
              logits.sizes(), ", got ", grad_out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == logits.scalar_type(), "aem_kernels: grad_out must have the logits' dtype ",
                   logits.scalar_type(), ", got ", grad_out.scalar_type());
  check_temperature(temperature);
  check_aliasing(logits, grad_out);
  const int64_t rows = logits.size(0) * logits.size(1);
  const at::ScalarType acc = compute_dtype(logits);
  at::Tensor labels64, state_c, entropy_c, grad_lp, grad_h;
  if (labels.has_value()) labels64 = checked_labels(*labels, rows, layout.vocab, ignore_index);
  state_c = checked_row_state(state, "state", rows, acc);
  entropy_c = checked_row_vector(entropy, "entropy", rows, acc);
  // Without labels there is no log-prob, so its gradient is ignored (as in the reference).
  if (grad_logprobs.has_value() && labels.has_value())
    grad_lp = checked_row_vector(*grad_logprobs, "grad_logprobs", rows, acc);
  if (grad_entropy.has_value()) grad_h = checked_row_vector(*grad_entropy, "grad_entropy", rows, acc);

  const BackwardArgs args{logits.const_data_ptr(),
                          layout,
                          grad_out.data_ptr(),
                          grad_layout,
                          labels.has_value() ? labels64.const_data_ptr<int64_t>() : nullptr,
                          ignore_index,
                          1.0 / temperature,
                          state_c.const_data_ptr(),
                          entropy_c.const_data_ptr(),
                          grad_lp.defined() ? grad_lp.const_data_ptr() : nullptr,
                          grad_h.defined() ? grad_h.const_data_ptr() : nullptr};
  const BackwardRowsFn kernel = active_kernels().backward[static_cast<int>(dtype)];
  at::parallel_for(0, rows, row_grain(layout.vocab),
                   [&](int64_t begin, int64_t end) { kernel(args, begin, end); });
}

// Functional form (a new gradient tensor), used by the op's autograd formula and by torch.compile users.
at::Tensor logprobs_entropy_bwd(const at::Tensor& logits, const c10::optional<at::Tensor>& labels,
                                const at::Tensor& state, const at::Tensor& entropy,
                                const c10::optional<at::Tensor>& grad_logprobs,
                                const c10::optional<at::Tensor>& grad_entropy, double temperature,
                                int64_t ignore_index) {
  at::Tensor grad = at::empty_like(logits, at::MemoryFormat::Contiguous);
  logprobs_entropy_bwd_(logits, labels, state, entropy, grad_logprobs, grad_entropy, temperature, ignore_index, grad);
  return grad;
}

}  // namespace cpu
}  // namespace aem_kernels
