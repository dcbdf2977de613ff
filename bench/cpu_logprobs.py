"""CPU benchmark of token log-prob + entropy, forward + backward, on [N, V] logits.

Compares the C++ backend of aem_kernels (backend="cpu", out of place and in place) with the same formula in
eager PyTorch (log_softmax + gather + entropy, autograd) and under torch.compile, and with a plain copy of the
logits (memory-bandwidth reference). "aem_cpu_kernels_warm_buffer" times the raw ops writing into a gradient
buffer that was touched before (as the copy's destination is): the kernels' speed without the first-touch page
faults of a fresh N x V buffer, which every out-of-place method pays (THP_MEM_ALLOC_ENABLE=1 makes torch ask
for huge pages and cuts that cost). Times are medians over interleaved rounds (every method once per round,
so a burst of load elsewhere on the machine hits all of them); peak extra memory is measured in a fresh
process per method (VmHWM over VmRSS once the inputs exist).

    python bench/cpu_logprobs.py                      # 4096 x 32000 fp32, writes bench/results/cpu/...
    python bench/cpu_logprobs.py --rows 512 --vocab 4096 --repeats 3 --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import aem_kernels as ak  # noqa: E402
from aem_kernels import _cpu  # noqa: E402

TEMPERATURE = 1.0


def eager_logprobs_entropy(logits: torch.Tensor, labels: torch.Tensor):
    """The formula users write: log_softmax, gather the label, entropy from the same log-probs."""
    logp = torch.log_softmax(logits.float() / TEMPERATURE, dim=-1)
    logprobs = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return logprobs, entropy


def _loss(logprobs, entropy, a, b):
    return (logprobs * a).sum() + (entropy * b).sum()


def make_methods() -> Dict[str, Callable]:
    """name -> step(logits_leaf, labels, a, b): forward, then backward; returns (t_forward, t_backward)."""
    compiled = torch.compile(lambda x, y, a, b: _loss(*eager_logprobs_entropy(x, y), a, b))

    def timed(forward):
        def step(x, y, a, b):
            start = time.perf_counter()
            loss = forward(x, y, a, b)
            mid = time.perf_counter()
            # dL/dlogits as the lm_head's backward would receive it (no AccumulateGrad copy into .grad)
            torch.autograd.grad(loss, x)
            return mid - start, time.perf_counter() - mid
        return step

    def fused(inplace):
        def forward(x, y, a, b):
            lp, h = ak.logprobs_and_entropy(x, y, temperature=TEMPERATURE, backend="cpu", inplace_backward=inplace)
            return _loss(lp, h, a, b)
        return forward

    warm_grad = {}

    def kernels_only(x, y, a, b):
        """The raw ops, the gradient written into a buffer allocated and touched once (like the copy's
        destination): the kernels' own speed, without the first-touch page faults of a fresh N x V buffer."""
        rows3d = x.detach().view(1, *x.shape)
        grad = warm_grad.setdefault("buf", torch.zeros_like(rows3d))
        start = time.perf_counter()
        _, entropy, lse = torch.ops.aem_kernels.logprobs_entropy_fwd(rows3d, y, TEMPERATURE, -100)
        mid = time.perf_counter()
        torch.ops.aem_kernels.logprobs_entropy_bwd_(rows3d, y, lse, entropy, a, b, TEMPERATURE, -100, grad)
        return mid - start, time.perf_counter() - mid

    return {
        "eager": timed(lambda x, y, a, b: _loss(*eager_logprobs_entropy(x, y), a, b)),
        "torch_compile": timed(compiled),
        "aem_cpu": timed(fused(False)),
        "aem_cpu_inplace": timed(fused(True)),
        "aem_cpu_kernels_warm_buffer": kernels_only,
    }


def make_inputs(rows: int, vocab: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(rows, vocab, generator=gen) * 2).to(dtype)
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    a = torch.randn(rows, generator=gen)
    b = torch.randn(rows, generator=gen)
    return logits, labels, a, b


def leaf_for(name: str, logits: torch.Tensor) -> torch.Tensor:
    # The in-place variant overwrites its input with the gradient (in training the logits are an intermediate
    # of the lm_head), so it gets a fresh copy; the copy is made before the timed region.
    if name == "aem_cpu_inplace":
        return logits.clone().requires_grad_()
    return logits.detach().requires_grad_()


def time_methods(args, methods) -> Dict[str, Dict[str, List[float]]]:
    logits, labels, a, b = make_inputs(args.rows, args.vocab, args.dtype)
    for name, step in methods.items():  # warm-up: compilation, first-touch of buffers
        step(leaf_for(name, logits), labels, a, b)
    times = {name: {"forward": [], "backward": [], "total": []} for name in methods}
    copy_dst = torch.empty_like(logits)
    times["copy"] = {"total": []}
    times["read"] = {"total": []}
    for _ in range(args.repeats):
        for name, step in methods.items():
            leaf = leaf_for(name, logits)
            fwd, bwd = step(leaf, labels, a, b)
            del leaf
            times[name]["forward"].append(fwd)
            times[name]["backward"].append(bwd)
            times[name]["total"].append(fwd + bwd)
        start = time.perf_counter()
        copy_dst.copy_(logits)
        times["copy"]["total"].append(time.perf_counter() - start)
        start = time.perf_counter()
        logits.sum()
        times["read"]["total"].append(time.perf_counter() - start)
    return times


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_memory_child(args) -> None:
    """In a fresh process: warm up once, reset the peak RSS, run once, print the peak over the baseline."""
    methods = make_methods()
    logits, labels, a, b = make_inputs(args.rows, args.vocab, args.dtype)
    step = methods[args.memory_of]
    step(leaf_for(args.memory_of, logits), labels, a, b)
    leaf = leaf_for(args.memory_of, logits)
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
        f.write("5")
    baseline = _status_kib("VmRSS")
    step(leaf, labels, a, b)
    print(json.dumps({"extra_peak_bytes": (_status_kib("VmHWM") - baseline) * 1024}))


def peak_memory(args, name: str) -> int:
    cmd = [sys.executable, os.path.abspath(__file__), "--rows", str(args.rows), "--vocab", str(args.vocab),
           "--dtype", str(args.dtype).replace("torch.", ""), "--memory-of", name]
    # Every allocation above 128 KiB is its own mapping, returned to the OS when freed, so the peak RSS sees
    # each temporary and none hides in memory the allocator kept from the warm-up.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=1800, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_peak_bytes"]


def summarise(args, times, memory) -> dict:
    elem = args.rows * args.vocab
    logit_bytes = elem * torch.finfo(args.dtype).bits // 8
    med = {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}
    copy_gbs = 2 * logit_bytes / med["copy"]["total"] / 1e9  # a copy reads and writes the bytes once
    read_gbs = logit_bytes / med["read"]["total"] / 1e9
    results = {}
    for name in ("eager", "torch_compile", "aem_cpu", "aem_cpu_inplace", "aem_cpu_kernels_warm_buffer"):
        m = med[name]
        entry = {
            "forward_s": m["forward"], "backward_s": m["backward"], "total_s": m["total"],
            "all_total_s": times[name]["total"],
            "speedup_vs_eager": med["eager"]["total"] / m["total"],
            "speedup_vs_torch_compile": med["torch_compile"]["total"] / m["total"],
        }
        if name.startswith("aem_cpu"):
            # the bound: forward reads the logits once, backward reads them once and writes the gradient once
            entry["effective_GBps"] = 3 * logit_bytes / m["total"] / 1e9
            entry["forward_read_GBps"] = logit_bytes / m["forward"] / 1e9
            entry["backward_rw_GBps"] = 2 * logit_bytes / m["backward"] / 1e9
            entry["fraction_of_copy_bandwidth"] = entry["effective_GBps"] / copy_gbs
        if name in memory:
            entry["extra_peak_bytes"] = memory[name]
            entry["extra_peak_in_logits"] = memory[name] / logit_bytes
        results[name] = entry
    return {
        "case": {"rows": args.rows, "vocab": args.vocab, "dtype": str(args.dtype), "temperature": TEMPERATURE,
                 "loss": "sum_t a_t logprob_t + b_t entropy_t, forward + backward"},
        "conditions": {
            "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(), "kernel_isa": _cpu.kernel_isa(),
            "repeats": args.repeats, "statistic": "median of interleaved rounds",
            "loadavg_before": args.loadavg_before, "loadavg_after": os.getloadavg(),
            "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"),
            "note": args.note,
        },
        "copy_GBps": copy_gbs, "read_GBps": read_gbs, "copy_s": med["copy"]["total"], "read_s": med["read"]["total"],
        "results": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-memory", action="store_true", help="skip the per-method peak-memory processes")
    parser.add_argument("--note", default="", help="free text stored with the conditions (e.g. machine load)")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "cpu", "cpu_kernels_dev.json"))
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not _cpu.is_available():
        sys.exit(f"the C++ extension is not available: {_cpu._IMPORT_ERROR}")
    if args.memory_of:
        peak_memory_child(args)
        return
    args.loadavg_before = os.getloadavg()
    times = time_methods(args, make_methods())
    memory = {} if args.no_memory else {name: peak_memory(args, name)
                                        for name in ("eager", "torch_compile", "aem_cpu", "aem_cpu_inplace")}
    summary = summarise(args, times, memory)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=2)
    print(f"{args.rows} x {args.vocab} {args.dtype}, {torch.get_num_threads()} threads, kernels: {_cpu.kernel_isa()}, "
          f"load {summary['conditions']['loadavg_before']} -> {summary['conditions']['loadavg_after']}")
    print(f"copy {summary['copy_GBps']:.1f} GB/s (read+write), read {summary['read_GBps']:.1f} GB/s")
    for name, r in summary["results"].items():
        extra = f", {r['effective_GBps']:.1f} GB/s effective" if "effective_GBps" in r else ""
        mem = f", peak extra {r['extra_peak_in_logits']:.2f} x logits" if "extra_peak_in_logits" in r else ""
        print(f"{name:28s} fwd {r['forward_s'] * 1e3:8.1f} ms  bwd {r['backward_s'] * 1e3:8.1f} ms  total "
              f"{r['total_s'] * 1e3:8.1f} ms  x{r['speedup_vs_eager']:.2f} vs eager  "
              f"x{r['speedup_vs_torch_compile']:.2f} vs compile{extra}{mem}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
