"""Accuracy of the fused paths on half-precision logits, against the fp64 reference and against the same
formula computed in the logits' own dtype (what eager code gets without an fp32 copy).

Every backend that can run here is measured (Triton on CPU tensors needs TRITON_INTERPRET=1, which this script
sets when there is no GPU). Writes one JSON with the max absolute errors of log-probs and entropies.

    python bench/precision.py                                   # 257 x 3001, scale 4, bf16 and fp16
    python bench/precision.py --rows 4096 --vocab 151936 --out bench/results/<gpu>/precision.json   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before aem_kernels imports triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import aem_kernels as ak  # noqa: E402


def _fp64_truth(logits: torch.Tensor, labels: torch.Tensor):
    log_p = torch.log_softmax(logits.double(), -1)
    return log_p.gather(-1, labels[:, None])[:, 0], -(log_p.exp() * log_p).sum(-1)


def _in_dtype(logits: torch.Tensor, labels: torch.Tensor):
    """verl's formulas evaluated in the logits' dtype: z[y] - logsumexp(z), logsumexp(z) - sum(softmax(z) z)."""
    lse = torch.logsumexp(logits, -1)
    logprobs = logits.gather(-1, labels[:, None])[:, 0] - lse
    entropy = lse - (torch.softmax(logits, -1) * logits).sum(-1)
    return logprobs, entropy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=257)
    parser.add_argument("--vocab", type=int, default=3001)
    parser.add_argument("--scale", type=float, default=4.0, help="std of the logits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "cpu", "precision.json"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator().manual_seed(args.seed)
    results = {}
    for dtype in (torch.bfloat16, torch.float16):
        logits = (torch.randn(args.rows, args.vocab, generator=generator) * args.scale).to(dtype).to(device)
        labels = torch.randint(0, args.vocab, (args.rows,), generator=generator).to(device)
        true_lp, true_h = _fp64_truth(logits, labels)
        lines = {"formula in the logits' dtype": _in_dtype(logits, labels)}
        for backend, reason in ak.available_backends(device).items():
            if reason is None:
                lines[f"aem_kernels[{backend}]"] = ak.logprobs_and_entropy(logits, labels, backend=backend)
        results[str(dtype).replace("torch.", "")] = {
            name: {"logprobs_max_abs_error": float((lp.double() - true_lp).abs().max()),
                   "entropy_max_abs_error": float((h.double() - true_h).abs().max())}
            for name, (lp, h) in lines.items()}
    doc = {"rows": args.rows, "vocab": args.vocab, "logit_std": args.scale, "seed": args.seed,
           "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.machine()})",
           "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"), "torch": torch.__version__,
           "errors_against_fp64": results}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=2)
    for dtype, lines in results.items():
        for name, errors in lines.items():
            print(f"{dtype:9s} {name:30s} log-prob {errors['logprobs_max_abs_error']:.2e}  "
                  f"entropy {errors['entropy_max_abs_error']:.2e}")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
