"""The ops, one folder each (as flash-linear-attention's `fla/ops/<op>/`):

    logprobs/      token log-probs and entropies from logits (eq. 1-2, section 6): the row backends (torch, cpu,
                   triton), the K-label gather, the vocab-parallel twin and the vocab-slice mixture math
    fused_linear/  the same from hidden states and the LM head weight, the logits never built: the chunk plan
                   and loop, the chunked, vocab-blocked, Triton and vocab-parallel paths
    segment/       per-response sums, counts and means over the token->response map (eq. 3, 3')
    policy_loss/   the per-token clipped surrogate and KL (eq. 8) with their derivatives, and the Triton
                   single-pass kernel of the AEM loss
    utils.py       the Triton kernels' shared launch table and jit helpers

Each folder has `naive.py` (the plain definition, the tests' oracle; production never imports it), one file
per backend or path, and an `__init__.py` with the op's public functions and its one path decision, made from
what `aem_kernels.capability` says this machine has. The ops import nothing of `aem_kernels.loss` and above.
"""
