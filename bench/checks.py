"""Correctness gate: every line's outputs are compared with the reference line before it is timed.

The reference is our torch backend (fp32 math whatever the logits' dtype; the test suite checks it against
fp64). A line whose outputs disagree beyond the tolerance is reported with its errors and not timed.

Per-token outputs (log-probs, entropies) must satisfy |x - ref| <= atol + rtol * |ref| everywhere; the
logits' gradient and the scalar loss are compared by relative error ||x - ref||_2 / ||ref||_2 (the
gradient's entries are tiny probabilities: an elementwise test would only measure their rounding).

The gate is there to catch a wrong implementation (a wrong formula, row, sign or label), not to rank
accuracy: every line's measured errors are published in the results next to its timings. Its tolerance
follows the precision the line works in:
  per-token outputs, by their own dtype:
    fp32: atol 1e-2, rtol 1e-3. Measured max errors at N=512, V=151936: eager 1.4e-4 (log_softmax over
          1.5e5 fp32 terms), TRL 8.7e-5, verl 2.3e-3 on the entropy: logsumexp(z) - sum(softmax(z) z)
          subtracts two numbers of size |z| ~ 15, so its error grows with the logits' scale and with V.
    bf16: atol 0.4, rtol 3e-2 (TRL and verl keep the logits' dtype). A bf16 number near log V ~ 12 is
          rounded by up to 2^-8 * 16 = 0.06, a log-prob z[y] - lse subtracts two of them, and the entropy
          sums V rounded products; measured 0.12 (verl log-prob) and 0.17 (TRL entropy).
    fp16: atol 0.1, rtol 5e-3 (three more mantissa bits than bf16).
  the logits' gradient, by its dtype (every line returns it in the logits' dtype): relative error 1e-3 for
    fp32 (measured <= 1.5e-4, verl), 5e-2 for bf16 (bf16 rounding of each entry alone gives ~2e-3; verl's
    bf16 softmax 1.2e-2), 1e-2 for fp16.
  the loss, by the lowest precision among the line's other outputs (a loss accumulated in fp32 from bf16
    log-probs is as precise as those): relative 1e-4 (fp32; measured 1.9e-5), 2e-2 (bf16; measured 7.9e-3),
    5e-3 (fp16).
"""

from __future__ import annotations

import math
from typing import Dict, Tuple

import torch

_TOKEN_TOL = {torch.float64: (1e-2, 1e-3), torch.float32: (1e-2, 1e-3), torch.float16: (0.1, 5e-3),
              torch.bfloat16: (0.4, 3e-2)}
_GRAD_TOL = {torch.float64: 1e-3, torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}
_LOSS_TOL = {torch.float64: 1e-4, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
RELATIVE_OUTPUTS = ("grad_logits", "loss")


def working_dtype(outputs: Dict[str, torch.Tensor]) -> torch.dtype:
    """The lowest-precision dtype among a line's outputs other than the gradient."""
    dtypes = [t.dtype for name, t in outputs.items() if name != "grad_logits" and t.is_floating_point()]
    return max(dtypes, key=lambda d: torch.finfo(d).eps) if dtypes else torch.float32


def tolerance(name: str, dtype: torch.dtype, work: torch.dtype) -> Tuple[float, float]:
    """(atol, rtol) for per-token outputs; (0, relative tolerance) for the gradient and the loss."""
    if name == "grad_logits":
        return 0.0, _GRAD_TOL[dtype]
    if name == "loss":
        return 0.0, _LOSS_TOL[work]
    return _TOKEN_TOL[dtype]


def _relative_error(out: torch.Tensor, ref: torch.Tensor, block: int = 1 << 24) -> float:
    """||out - ref||_2 / ||ref||_2 in blocks of `block` elements (a gradient is N x V: no fp64 copy of it)."""
    x, r = out.detach().reshape(-1), ref.detach().reshape(-1)
    diff_sq = ref_sq = 0.0
    for start in range(0, x.numel(), block):
        xb, rb = x[start:start + block].float(), r[start:start + block].float()
        diff_sq += float((xb - rb).norm()) ** 2
        ref_sq += float(rb.norm()) ** 2
    return math.sqrt(diff_sq) / max(math.sqrt(ref_sq), 1e-30)


def compare(outputs: Dict[str, torch.Tensor], reference: Dict[str, torch.Tensor]) -> Tuple[bool, Dict[str, dict]]:
    """(all within tolerance, per output a report). Per-token outputs report their max absolute error and
    pass when every entry is within atol + rtol |ref|; the gradient and the loss report their relative
    error. The benchmark's inputs have no all -inf row, so any NaN or inf in a line's output fails it."""
    report: Dict[str, dict] = {}
    passed = True
    work = working_dtype(outputs)
    for name, ref in reference.items():
        out = outputs.get(name)
        if out is None or tuple(out.shape) != tuple(ref.shape):
            shape = None if out is None else tuple(out.shape)
            report[name] = {"passed": False, "detail": f"shape {shape}, expected {tuple(ref.shape)}"}
            passed = False
            continue
        atol, rtol = tolerance(name, out.dtype, work)
        dtype = str(out.dtype).replace("torch.", "")
        if name in RELATIVE_OUTPUTS:
            err = _relative_error(out, ref)
            report[name] = {"rel_error": err, "rel_tol": rtol, "dtype": dtype}
            ok = err <= rtol          # False for NaN
        else:   # O(N) values: exact in fp64
            x, r = out.detach().double(), ref.detach().double()
            deviation = (x - r).abs()
            worst = float((deviation / (atol + rtol * r.abs())).max()) if x.numel() else 0.0
            report[name] = {"max_abs_error": float(deviation.max()) if x.numel() else 0.0, "atol": atol,
                            "rtol": rtol, "dtype": dtype}
            ok = worst <= 1.0         # False for NaN
        if not ok and not math.isfinite(report[name].get("rel_error", report[name].get("max_abs_error"))):
            report[name]["detail"] = "NaN or inf in the output"
        report[name]["passed"] = ok
        passed = passed and ok
    return passed, report
