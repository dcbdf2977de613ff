"""Correctness gate: every line's outputs are compared with the reference line before it is timed.

The reference is our torch backend (fp32 math whatever the logits' dtype; the test suite checks it against
fp64). A line whose outputs disagree beyond the tolerance is reported with its errors and not timed.

Per-token outputs (log-probs, entropies) must satisfy |x - ref| <= atol + rtol * |ref| everywhere; the
logits' gradient is compared by its relative error ||x - ref||_2 / ||ref||_2 (its entries are tiny
probabilities: an elementwise test would only measure their rounding), the scalar loss likewise (below).

The gate is there to catch a wrong implementation (a wrong formula, row, sign or label), not to rank
accuracy: every line's measured errors are published in the results next to its timings. Its tolerance
follows the precision the line works in. A line's working precision is the lowest precision among its
outputs other than the gradient (TRL and verl return bf16/fp16 log-probs for bf16/fp16 logits; every other
line computes in fp32).
  per-token outputs, by their own dtype:
    fp32: atol 1e-2, rtol 1e-3. Measured max errors at N=512, V=151936: eager 1.4e-4 (log_softmax over
          1.5e5 fp32 terms), TRL 8.7e-5, verl 2.3e-3 on the entropy: logsumexp(z) - sum(softmax(z) z)
          subtracts two numbers of size |z| ~ 15, so its error grows with the logits' scale and with V.
    bf16: atol 0.4, rtol 3e-2. A bf16 number near log V ~ 12 is rounded by up to 2^-8 * 16 = 0.06, a
          log-prob z[y] - lse subtracts two of them, and the entropy sums V rounded products; measured 0.12
          (verl log-prob) and 0.17 (TRL entropy).
    fp16: atol 0.1, rtol 5e-3; measured 0.013 (verl log-prob), 0.022 (TRL entropy).
  the logits' gradient (relative L2 error), the larger of a storage and a working-precision allowance:
    storage, by the gradient's dtype (the logits'): 1e-3 fp32, 2e-2 bf16, 5e-3 fp16 (two fp32 algorithms
      rounded to bf16 differ by an ulp, 2^-8, in some entries; measured <= 1.5e-4 for fp32-working lines);
    working: 1e-3 fp32, 0.2 bf16, 2e-2 fp16. In the AEM loss the PPO ratio exp(l - l_old) turns a bf16
      log-prob error of ~0.06 nat into a ~6 % error of that token's weight: measured 0.039 (verl) and 0.026
      (TRL) at N=512, V=151936, up to 0.049 on the smoke test's tiny shapes (8 seeds); fp16 4.3e-3. A wrong
      gradient is off by ~1 (2 for a sign error).
  the loss (error relative to max(|loss|, 1): its per-token terms are ~|advantage| ~ 1 and have both
    signs, so the loss itself can be near 0), by the working precision: 1e-4 fp32 (measured 2.7e-5, verl),
    5e-2 bf16 (measured 3.5e-3 at V=151936, 1.2e-2 on tiny shapes), 2e-2 fp16 (measured 2.4e-4).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

_TOKEN_TOL = {torch.float64: (1e-2, 1e-3), torch.float32: (1e-2, 1e-3), torch.float16: (0.1, 5e-3),
              torch.bfloat16: (0.4, 3e-2)}
_GRAD_STORAGE_TOL = {torch.float64: 1e-3, torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}
_GRAD_WORKING_TOL = {torch.float64: 1e-3, torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 0.2}
_LOSS_TOL = {torch.float64: 1e-4, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
RELATIVE_OUTPUTS = ("grad_logits", "loss")   # and every other gradient, named grad_<input> (grad_hidden, ...)


def _is_gradient(name: str) -> bool:
    return name.startswith("grad_")


def _is_relative(name: str) -> bool:
    return name in RELATIVE_OUTPUTS or _is_gradient(name)


def working_dtype(outputs: Dict[str, torch.Tensor]) -> torch.dtype:
    """The lowest-precision dtype among a line's outputs other than the gradient."""
    dtypes = [t.dtype for name, t in outputs.items() if not _is_gradient(name) and t.is_floating_point()]
    return max(dtypes, key=lambda d: torch.finfo(d).eps) if dtypes else torch.float32


def tolerance(name: str, dtype: torch.dtype, work: torch.dtype) -> Tuple[float, float]:
    """(atol, rtol) for per-token outputs; (0, relative tolerance) for the gradient and the loss."""
    if _is_gradient(name):
        return 0.0, max(_GRAD_STORAGE_TOL[dtype], _GRAD_WORKING_TOL[work])
    if name == "loss":
        return 0.0, _LOSS_TOL[work]
    return _TOKEN_TOL[dtype]


def _relative_error(out: torch.Tensor, ref: torch.Tensor, floor: float = 1e-30, block: int = 1 << 24) -> float:
    """||out - ref||_2 / max(||ref||_2, floor) in blocks of `block` elements (a gradient is N x V: no fp64
    copy of it)."""
    x, r = out.detach().reshape(-1), ref.detach().reshape(-1)
    diff_sq = ref_sq = 0.0
    for start in range(0, x.numel(), block):
        xb, rb = x[start:start + block].float(), r[start:start + block].float()
        diff_sq += float((xb - rb).norm()) ** 2
        ref_sq += float(rb.norm()) ** 2
    return math.sqrt(diff_sq) / max(math.sqrt(ref_sq), floor)


def compare(outputs: Dict[str, torch.Tensor], reference: Dict[str, torch.Tensor],
            scale: Optional[Dict[str, float]] = None) -> Tuple[bool, Dict[str, dict]]:
    """(all within tolerance, per output a report). Per-token outputs report their max absolute error and
    pass when every entry is within atol + rtol |ref|; the gradient and the loss report their relative
    error. `scale`: output name -> a factor on its tolerances, for a case whose outputs amplify the per-token
    rounding (`Case.tolerance_scale`). The benchmark's inputs have no all -inf row, so any NaN or inf in a
    line's output fails it."""
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
        factor = (scale or {}).get(name, 1.0)
        atol, rtol = atol * factor, rtol * factor
        dtype = str(out.dtype).replace("torch.", "")
        if _is_relative(name):
            # a loss averages per-token terms of both signs (about |advantage| ~ 1 each) and can be near 0:
            # its error is taken relative to max(|loss|, 1)
            err = _relative_error(out, ref, floor=1.0 if name == "loss" else 1e-30)
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
