"""Timing, peak memory and the memory-bandwidth roofline, on CUDA or on the CPU.

Time: warm-up calls, then repeated calls until both a minimum count and a minimum total time are reached
(capped at a maximum count); the statistics are the median, the quartiles, min and max of the samples. On
CUDA every sample is bracketed by CUDA events after the L2 cache was overwritten (a 256 MiB write outside
the bracket), so a small problem is not timed from a warm cache; on the CPU by time.perf_counter.

Peak memory is the most memory the call's tensors held at once beyond what was allocated when it started
(the inputs, the reference outputs and anything else alive are excluded); it is measured on the first call
of each line (the one whose outputs are checked; for torch.compile on a second call, after compiling):
  CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated() at the
        start of the call.
  CPU:  torch's memory profiler (torch.profiler with profile_memory=True) records every allocation and free
        of the call with its size; the peak is the largest running sum. This counts tensor bytes exactly as
        the CUDA number does, independent of how glibc caches freed pages (a resident-set measure would hide
        a reused free block and count pages the allocator keeps), and it needs no subprocess per line.
        Memory a C++ kernel allocates outside torch's allocator is not seen.

Roofline: the least memory traffic any implementation must cause (see each case's `traffic_bytes`) over
the median time gives GB/s; the device's bandwidth is its HBM peak from `HBM_BANDWIDTH` on CUDA (override
with --peak-gbs) and, on the CPU, the measured bandwidth of `dst.copy_(src)` over the same bytes as the logits
(a read and a write each), i.e. what the memory system sustains here, not a datasheet number.
"""

from __future__ import annotations

import contextlib
import os
import sys
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

# Peak HBM bandwidth (bytes/s) by a substring of torch.cuda.get_device_name(); the first match wins, so the
# more specific names come first. Public datasheet figures.
HBM_BANDWIDTH = (
    ("GH200", 4.0e12),
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),          # SXM
    ("H800", 3.35e12),
    ("H20", 4.0e12),
    ("B200", 8.0e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),         # 40 GB
    ("L40S", 0.864e12),
    ("L4", 0.3e12),
    ("A10", 0.6e12),
    ("RTX 4090", 1.008e12),
    ("RTX 3090", 0.936e12),
    ("V100", 0.9e12),
    ("T4", 0.32e12),
)

@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(device: torch.device, call: Callable[[], object]) -> Tuple[object, int]:
    """Runs `call()` and returns (its result, the peak bytes its tensors held beyond the starting point)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = call()
        torch.cuda.synchronize(device)
        return out, max(0, torch.cuda.max_memory_allocated(device) - baseline)
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():   # the profiler's C++ side logs each start and stop to stderr
        prof.__enter__()
    try:
        out = call()
    finally:
        with _quiet_stderr():
            prof.__exit__(None, None, None)
    running = peak = 0
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() ==
              torch.autograd.DeviceType.CPU]
    for event in sorted(events, key=lambda e: e.start_ns()):
        running += event.nbytes()
        peak = max(peak, running)
    return out, peak


@dataclass
class TimingPolicy:
    warmup: int = 1
    min_reps: int = 3
    max_reps: int = 20
    min_time_s: float = 0.5


def summarize(samples: List[float]) -> Dict[str, object]:
    ordered = sorted(samples)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {"median": statistics.median(ordered), "q1": q1, "q3": q3, "min": ordered[0], "max": ordered[-1],
            "mean": statistics.fmean(ordered), "n": len(ordered), "samples": samples}


class Timer:
    """Times `call(state)` where `state = setup()` is prepared outside the timed interval."""

    def __init__(self, device: torch.device, l2_flush_bytes: int = 256 << 20) -> None:
        self.device = device
        self._flush = None
        if device.type == "cuda":
            self._flush = torch.empty(l2_flush_bytes, dtype=torch.uint8, device=device)

    def _one(self, call: Callable, state) -> float:
        if self.device.type == "cuda":
            self._flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = call(state)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            begin = time.perf_counter()
            out = call(state)
            seconds = time.perf_counter() - begin
        del out
        return seconds

    def run(self, setup: Callable, call: Callable, policy: TimingPolicy) -> Dict[str, object]:
        """Warm-up calls, then timed calls; returns the statistics of the timed ones."""
        for _ in range(policy.warmup):
            self._one(call, setup())
        samples: List[float] = []
        while len(samples) < policy.min_reps or (sum(samples) < policy.min_time_s and len(samples) < policy.max_reps):
            samples.append(self._one(call, setup()))
        return summarize(samples)


def gpu_peak_bandwidth(device: torch.device) -> Optional[float]:
    name = torch.cuda.get_device_name(device)
    for key, bandwidth in HBM_BANDWIDTH:
        if key.lower() in name.lower():
            return bandwidth
    return None


def cpu_copy_bandwidth(nbytes: int, reps: int = 3) -> float:
    """Bytes/s of dst.copy_(src) over `nbytes` (read + write), pages touched beforehand; median of `reps`."""
    numel = max(1, nbytes // 4)
    src = torch.ones(numel, dtype=torch.float32)
    dst = torch.zeros_like(src)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        begin = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - begin)
    return 2 * numel * 4 / statistics.median(times)
