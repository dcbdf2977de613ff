"""Triton kernels (imported lazily by `aem_kernels.dispatch` for backend="triton"; they need Triton).

`logprobs`: log-probs, entropies and their gradient from [B, T, V] logits (eq. 1-2, section 6), with
optional per-response sums (eq. 3, 3'). `aem_loss`: the single-pass AEM policy loss (loss terms and the
logits' gradient from one launch). `segment`: deterministic segment sums (the CUDA backend of
`aem_kernels.reductions`). `utils`: launch table and helpers.

The modules here are leaves: they take tensors and scalars and import nothing of the loss, the dispatcher,
the public API or the other backends (a test walks their imports). This file declares what the Triton
backend serves, without importing Triton, for `dispatch.py` to decide with.
"""

import torch

# Capabilities of the Triton backend, read by dispatch.py.
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FP64_REASON = ('the Triton kernels compute in fp32, so they do not serve fp64 logits; use backend="auto" '
               '(the C++ kernels on CPU tensors, the torch backend elsewhere, both computing in fp64) or '
               'backend="torch"')
HAS_SINGLE_PASS_LOSS = True
