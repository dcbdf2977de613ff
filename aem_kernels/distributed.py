"""The vocab-parallel ops for Megatron-style tensor parallelism, where rank k of a group holds the logits (or the
lm_head rows) of a contiguous slice of the vocabulary: every rank gets the full-vocabulary log-probs and
entropies (eq. 1-2) of every token with three [N] all_reduces, and the gradient of its own slice.

    vocab_parallel_logprobs_and_entropy(logits_shard, labels, *, group=None, vocab_start=None, ...)
    vocab_parallel_fused_linear_logprobs_and_entropy(hidden, weight_shard, labels, *, bias_shard=None, ...)

The math is in `aem_kernels.ops.logprobs.vocab_parallel`; the fused-linear twin is in
`aem_kernels.ops.fused_linear.vocab_parallel`. `process_group=` of the loss and the modulation is the other
distributed feature (data parallelism): see `aem_kernels.loss`.
"""

from __future__ import annotations

from .ops.fused_linear.vocab_parallel import (VocabParallelFusedLinearFunction,
                                              vocab_parallel_fused_linear_logprobs_and_entropy)
from .ops.logprobs.vocab_parallel import VocabParallelLogprobsEntropyFunction, vocab_parallel_logprobs_and_entropy

__all__ = ["VocabParallelFusedLinearFunction", "VocabParallelLogprobsEntropyFunction",
           "vocab_parallel_fused_linear_logprobs_and_entropy", "vocab_parallel_logprobs_and_entropy"]
