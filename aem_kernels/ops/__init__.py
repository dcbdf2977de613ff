"""Triton kernels (imported lazily by `aem_kernels.dispatch` for backend="triton"; they need Triton).

`logprobs`: log-probs, entropies and their gradient from [B, T, V] logits (eq. 1-2, section 6), with
optional per-response sums (eq. 3, 3'). `aem_loss`: the single-pass AEM policy loss (loss terms and the
logits' gradient from one launch). `segment`: deterministic segment sums. `utils`: launch table and helpers.
"""
