"""Independent fp64 formulations the tests compare against (written from the definitions, not from our code)."""

from __future__ import annotations

import os

import torch

from aem_kernels import capability
from aem_kernels.ops.logprobs import naive as ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the C++ extension: loaded or not, and why not
CPP_BUILT = capability.cpu_extension() is not None
CPP_REASON = f"C++ extension not built: {capability.cpu_extension_reason()}"


def oracle_logprobs_entropy(logits: torch.Tensor, labels: torch.Tensor | None, temperature: float = 1.0,
                            ignore_index: int = -100):
    """eq. 1-2 via torch.log_softmax in fp64; ignored positions give 0 (labels None: entropy everywhere)."""
    log_p = torch.log_softmax(logits.double() / temperature, dim=-1)
    p = log_p.exp()
    # -inf logits: p = 0 and p log p -> 0; masking log_p (not the product) keeps autograd free of 0 * inf.
    entropy = -(p * torch.where(p > 0, log_p, torch.zeros((), dtype=torch.float64))).sum(-1)
    if labels is None:
        return None, entropy
    active = labels != ignore_index
    logprobs = log_p.gather(-1, torch.where(active, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(active, logprobs, 0.0), torch.where(active, entropy, 0.0)


def adversarial_logits(kind: str, n: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """fp64 logits of a named adversarial kind, [n, vocab]."""
    if kind == "normal":
        return torch.randn(n, vocab, generator=generator, dtype=torch.float64) * 3
    if kind == "huge":
        return (torch.rand(n, vocab, generator=generator, dtype=torch.float64) * 2 - 1) * 1e4
    if kind == "neg_inf":
        x = torch.randn(n, vocab, generator=generator, dtype=torch.float64)
        x[torch.rand(n, vocab, generator=generator) < 0.3] = float("-inf")
        x[:, 0] = torch.randn(n, generator=generator, dtype=torch.float64)  # every row keeps a finite entry
        return x
    if kind == "equal":
        return torch.full((n, vocab), 7.25, dtype=torch.float64)
    if kind == "peaked":
        x = torch.randn(n, vocab, generator=generator, dtype=torch.float64)
        x[:, vocab // 2] += 60.0
        return x
    raise ValueError(kind)


def reference_forward(logits3d: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                      ignore_index: int = -100):
    """(log-probs, entropy, lse) of our torch reference in fp64, the twin every fused kernel is checked against."""
    return ref.logprobs_entropy_fwd_ref(logits3d.double(), labels, temperature, ignore_index)


def reference_backward(logits3d: torch.Tensor, labels: torch.Tensor, temperature: float, grad_logprobs, grad_entropy,
                       ignore_index: int = -100) -> torch.Tensor:
    """fp64 gradient of sum a_t logprob_t + b_t entropy_t with respect to the logits (section 6)."""
    _, entropy, lse = reference_forward(logits3d, labels, temperature, ignore_index)
    out = torch.empty(logits3d.shape, dtype=torch.float64, device=logits3d.device)
    as_double = (lambda g: g.double() if g is not None else None)  # noqa: E731
    return ref.logprobs_entropy_bwd_ref(logits3d.double(), labels, lse, entropy, as_double(grad_logprobs),
                                        as_double(grad_entropy), temperature, ignore_index, out)


def compile_for_sm90(script: str, timeout: int) -> list:
    """Run one of the ahead-of-time sm_90 compile scripts beside this file (Triton's real pipeline, no GPU
    needed) and return its JSON records, one per compiled kernel; skips where Triton cannot do it here."""
    import json
    import os
    import subprocess
    import sys

    import pytest
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("Triton's NVIDIA backend (ptxas) is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), script)],
                         env=env, capture_output=True, text=True, timeout=timeout)
    if "No module named 'triton.backends.compiler'" in out.stderr or "cannot import name 'ASTSource'" in out.stderr:
        pytest.skip("this Triton has no ahead-of-time compile API")
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
