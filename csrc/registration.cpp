// The aem_kernels._C extension: registers the CPU ops with torch.library (so torch.ops.aem_kernels.* work in
// eager mode and inside torch.compile; the fake implementations live in aem_kernels/_cpu.py) and chooses the
// row kernels' instruction set once.
#include <ATen/Version.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <atomic>
#include <string>

#include "cpu_kernels.h"

namespace aem_kernels {
namespace cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_entropy_fwd(const at::Tensor&, const c10::optional<at::Tensor>&,
                                                                    double, int64_t, bool);
void logprobs_entropy_bwd_(const at::Tensor&, const c10::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                           const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, double, int64_t,
                           const at::Tensor&);
at::Tensor logprobs_entropy_bwd(const at::Tensor&, const c10::optional<at::Tensor>&, const at::Tensor&,
                                const at::Tensor&, const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                                double, int64_t);
at::Tensor segment_sum(const at::Tensor&, const at::Tensor&, int64_t);

namespace {

bool cpu_has_avx2() {
#if defined(AEM_KERNELS_HAVE_AVX2_VARIANT)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

// torch's own choice ("DEFAULT", "AVX2", "AVX512"; ATEN_CPU_CAPABILITY=default forces DEFAULT) gates ours.
const RowKernelTable* detect_kernels() {
#if defined(AEM_KERNELS_HAVE_AVX2_VARIANT)
  if (at::get_cpu_capability() != "DEFAULT" && cpu_has_avx2()) return &avx2::kernel_table();
#endif
  return &baseline::kernel_table();
}

std::atomic<const RowKernelTable*>& kernels() {
  static std::atomic<const RowKernelTable*> table{detect_kernels()};
  return table;
}

}  // namespace

const RowKernelTable& active_kernels() { return *kernels().load(std::memory_order_acquire); }

bool select_kernels(const char* isa) {
  const std::string name(isa);
  if (name == "auto") {
    kernels().store(detect_kernels());
  } else if (name == "baseline") {
    kernels().store(&baseline::kernel_table());
#if defined(AEM_KERNELS_HAVE_AVX2_VARIANT)
  } else if (name == "avx2" && cpu_has_avx2()) {
    kernels().store(&avx2::kernel_table());
#endif
  } else {
    return false;
  }
  return true;
}

}  // namespace cpu
}  // namespace aem_kernels

TORCH_LIBRARY(aem_kernels, m) {
  // with_entropy=False: entropy comes back empty ([0]) and its sum is skipped (callers that use only l).
  m.def("logprobs_entropy_fwd(Tensor logits, Tensor? labels, float temperature, int ignore_index, "
        "bool with_entropy=True) -> (Tensor logprobs, Tensor entropy, Tensor state)");
  m.def("logprobs_entropy_bwd_(Tensor logits, Tensor? labels, Tensor state, Tensor entropy, Tensor? grad_logprobs, "
        "Tensor? grad_entropy, float temperature, int ignore_index, Tensor(a!) grad_out) -> ()");
  m.def("logprobs_entropy_bwd(Tensor logits, Tensor? labels, Tensor state, Tensor entropy, Tensor? grad_logprobs, "
        "Tensor? grad_entropy, float temperature, int ignore_index) -> Tensor");
  m.def("segment_sum(Tensor values, Tensor segment_ids, int num_segments) -> Tensor");
}

TORCH_LIBRARY_IMPL(aem_kernels, CPU, m) {
  m.impl("logprobs_entropy_fwd", &aem_kernels::cpu::logprobs_entropy_fwd);
  m.impl("logprobs_entropy_bwd_", &aem_kernels::cpu::logprobs_entropy_bwd_);
  m.impl("logprobs_entropy_bwd", &aem_kernels::cpu::logprobs_entropy_bwd);
  m.impl("segment_sum", &aem_kernels::cpu::segment_sum);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "aem_kernels C++ CPU kernels; the ops are registered as torch.ops.aem_kernels.*";
  module.def("kernel_isa", [] { return std::string(aem_kernels::cpu::active_kernels().isa); },
             "Instruction set of the row kernels in use: 'avx2' or 'baseline'.");
  module.def("_select_kernels", [](const std::string& isa) { return aem_kernels::cpu::select_kernels(isa.c_str()); },
             "Test hook: force 'baseline', 'avx2' or 'auto'; returns False when this build or CPU cannot run it.");
}
