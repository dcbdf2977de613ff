"""The C++ segment sum (`torch.ops.aem_kernels.segment_sum`, from the extension that `capability.py` loads):
deterministic, fp64 accumulation; its fake implementation and autograd formula are registered here."""

from __future__ import annotations

import torch

from ...capability import cpu_extension
from .autograd import segment_sum_backward, segment_sum_setup_context

__all__ = ["segment_sum"]


def segment_sum(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """out[r] = sum of values[t] over segment_ids[t] == r (-1 dropped), [R] in values' dtype; differentiable."""
    return torch.ops.aem_kernels.segment_sum(values, segment_ids, int(num_segments))


def _register_op_python_parts() -> None:
    @torch.library.register_fake("aem_kernels::segment_sum")
    def _segment_sum_fake(values, segment_ids, num_segments):
        return values.new_empty((num_segments,))

    torch.library.register_autograd("aem_kernels::segment_sum", segment_sum_backward,
                                    setup_context=segment_sum_setup_context)


if cpu_extension() is not None:
    _register_op_python_parts()
