"""Timing, peak memory and the memory-bandwidth roofline, on CUDA or on the CPU.

Time (`Timer`, the one timer of the benchmark): warm-up calls, then repeated calls until both a minimum count
and a minimum total time are reached (capped at a maximum count); the statistics are the median, the
quartiles, min and max of the samples. On CUDA every sample is bracketed by CUDA events after the L2 cache
was overwritten (a 256 MiB write outside the bracket), so a small problem is not timed from a warm cache; on
the CPU by time.perf_counter. A call may split itself into phases with `phase_end("forward")`: each phase's
statistics are reported next to the total. With `TimingPolicy.interleave` the lines of a point are timed in
rounds (every line once per round) instead of one after the other.

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
(a read and a write each), i.e. what the memory system sustains here, not a datasheet number; it is timed by
the same Timer (`bandwidth_probes`), in the rounds of an interleaved profile.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
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
    """How often each line is called: `warmup` untimed calls, then timed calls until both `min_reps` calls and
    `min_time_s` seconds (at most `max_reps`). `interleave`: the lines of one (case, point) are timed in rounds,
    every line once per round (and, on the CPU, the memory-bandwidth probes with them), so that a burst of load
    elsewhere on the machine hits all of them alike; otherwise each line's calls run back to back."""

    warmup: int = 1
    min_reps: int = 3
    max_reps: int = 20
    min_time_s: float = 0.5
    interleave: bool = False


def summarize(samples: List[float]) -> Dict[str, object]:
    ordered = sorted(samples)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {"median": statistics.median(ordered), "q1": q1, "q3": q3, "min": ordered[0], "max": ordered[-1],
            "mean": statistics.fmean(ordered), "n": len(ordered), "samples": samples}


class _Clock:
    """Time stamps of one timed call: perf_counter on the CPU, recorded CUDA events on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.stamps: List[Tuple[str, object]] = []

    def stamp(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.stamps.append((name, event))
        else:
            self.stamps.append((name, time.perf_counter()))

    def intervals(self) -> List[Tuple[str, float]]:
        """(name, seconds) from each stamp to the next; the first stamp is the call's start."""
        if self.cuda:
            self.stamps[-1][1].synchronize()
            delta = lambda a, b: a.elapsed_time(b) / 1e3  # noqa: E731
        else:
            delta = lambda a, b: b - a  # noqa: E731
        return [(name, delta(self.stamps[i - 1][1], t)) for i, (name, t) in enumerate(self.stamps) if i]


_ACTIVE_CLOCK: Optional[_Clock] = None


def phase_end(name: str) -> None:
    """Called inside a timed call: the time since the call started (or since the previous `phase_end`) is
    reported as phase `name` (e.g. "forward" before the backward starts) next to the call's total. Outside a
    timed call it does nothing, so a case may call it unconditionally."""
    if _ACTIVE_CLOCK is not None:
        _ACTIVE_CLOCK.stamp(name)


Sample = Tuple[float, Dict[str, float]]


class Timer:
    """The one timer of the benchmark: times `call(state)` where `state = setup()` is prepared outside the
    timed interval; every line, the roofline's memory copy and the interleaved rounds go through `sample`."""

    def __init__(self, device: torch.device, l2_flush_bytes: int = 256 << 20) -> None:
        self.device = device
        self._flush = None
        if device.type == "cuda":
            self._flush = torch.empty(l2_flush_bytes, dtype=torch.uint8, device=device)

    def sample(self, call: Callable, state) -> Sample:
        """One timed call: (seconds, {phase: seconds} for the phases the call marked with `phase_end`)."""
        global _ACTIVE_CLOCK
        if self._flush is not None:
            self._flush.zero_()
        clock = _Clock(self.device)
        clock.stamp("start")
        _ACTIVE_CLOCK = clock
        try:
            out = call(state)
        finally:
            _ACTIVE_CLOCK = None
        clock.stamp("end")
        del out
        intervals = clock.intervals()
        phases = {name: seconds for name, seconds in intervals[:-1]}
        return sum(seconds for _, seconds in intervals), phases

    @staticmethod
    def _stats(samples: List[Sample]) -> Dict[str, object]:
        stats = summarize([total for total, _ in samples])
        names = samples[0][1].keys()
        if names and all(phases.keys() == names for _, phases in samples):
            stats["phases"] = {name: summarize([phases[name] for _, phases in samples]) for name in names}
        return stats

    def run(self, setup: Callable, call: Callable, policy: TimingPolicy) -> Dict[str, object]:
        """Warm-up calls, then timed calls; returns the statistics of the timed ones."""
        for _ in range(policy.warmup):
            self.sample(call, setup())
        samples: List[Sample] = []
        while len(samples) < policy.min_reps or (sum(t for t, _ in samples) < policy.min_time_s
                                                 and len(samples) < policy.max_reps):
            samples.append(self.sample(call, setup()))
        return self._stats(samples)

    def run_interleaved(self, entries: Dict[str, Tuple[Callable, Callable]],
                        policy: TimingPolicy) -> Dict[str, object]:
        """`entries`: name -> (setup, call). Warm-up calls, then rounds in which every entry is called once, in
        order, until `min_reps` rounds and `min_time_s` seconds of the slowest entry (at most `max_reps`).
        Returns name -> statistics, or name -> the exception that stopped that entry (it leaves the rounds;
        the others go on)."""
        failed: Dict[str, BaseException] = {}
        samples: Dict[str, List[Sample]] = {name: [] for name in entries}

        def one(name: str, setup: Callable, call: Callable) -> Optional[Sample]:
            try:
                return self.sample(call, setup())
            except Exception as exc:   # recorded for that entry; the rounds continue without it
                failed[name] = exc
                return None

        for _ in range(policy.warmup):
            for name, (setup, call) in entries.items():
                if name not in failed:
                    one(name, setup, call)
        rounds = 0
        while True:
            alive = [name for name in entries if name not in failed]
            slowest = max((sum(t for t, _ in samples[name]) for name in alive), default=0.0)
            if not alive or (rounds >= policy.min_reps and (slowest >= policy.min_time_s or rounds >= policy.max_reps)):
                break
            for name in alive:
                setup, call = entries[name]
                result = one(name, setup, call)
                if result is not None:
                    samples[name].append(result)
            rounds += 1
        return {name: failed.get(name) or self._stats(samples[name]) for name in entries}


def gpu_peak_bandwidth(device: torch.device) -> Optional[float]:
    name = torch.cuda.get_device_name(device)
    for key, bandwidth in HBM_BANDWIDTH:
        if key.lower() in name.lower():
            return bandwidth
    return None


def bandwidth_probes(nbytes: int, device: torch.device) -> Dict[str, Tuple[Callable, Callable, int]]:
    """What the memory system sustains, as calls for the Timer: name -> (setup, call, bytes moved per call).
    "memory copy" is dst.copy_(src) over `nbytes` (a read and a write of each byte), "memory read" src.sum()
    (a read). The buffers are touched once here, so no call pays first-touch page faults."""
    numel = max(1, nbytes // 4)
    src = torch.ones(numel, dtype=torch.float32, device=device)
    dst = torch.zeros_like(src)
    dst.copy_(src)
    return {"memory copy": (lambda: None, lambda _: dst.copy_(src), 2 * numel * 4),
            "memory read": (lambda: None, lambda _: src.sum(), numel * 4)}


class BandwidthRoofline:
    """The device's bandwidth in bytes/s: the HBM peak on CUDA, a measured copy_ on the CPU (per logits
    size, capped at 1 GiB: far beyond any last-level cache, so the figure no longer depends on it), timed by
    the benchmark's Timer, or taken from the interleaved rounds of the lines (`record`). Every CPU
    measurement is kept (`measurements`) for the results' "bandwidth" list. `point`: anything with
    `logits_bytes` (a `bench.cases.Point`)."""

    def __init__(self, device: torch.device, peak_override: Optional[float] = None) -> None:
        self.device = device
        self.override = peak_override
        self._cpu: Dict[int, dict] = {}

    @property
    def measured(self) -> bool:
        """True when the bandwidth is measured here (the CPU without --peak-gbs)."""
        return self.device.type != "cuda" and not self.override

    @staticmethod
    def probe_bytes(point) -> int:
        return min(point.logits_bytes, 1 << 30)

    def record(self, nbytes: int, stats: Dict[str, dict], moved: Dict[str, int], how: str) -> None:
        entry = {"bytes": nbytes, "how": how}
        for name, s in stats.items():
            key = name.replace("memory ", "")
            entry[f"{key}_gbs"] = moved[name] / s["median"] / 1e9
            entry[f"{key}_time_s"] = s
        self._cpu[nbytes] = entry

    def bytes_per_s(self, point) -> Tuple[Optional[float], str]:
        if self.override:
            return self.override, "given by --peak-gbs"
        if self.device.type == "cuda":
            peak = gpu_peak_bandwidth(self.device)
            return peak, "HBM datasheet peak" if peak else "unknown device (pass --peak-gbs)"
        nbytes = self.probe_bytes(point)
        if nbytes not in self._cpu:
            probes = bandwidth_probes(nbytes, self.device)
            timer, policy = Timer(self.device), TimingPolicy(warmup=0, min_reps=3, max_reps=3)
            stats = {name: timer.run(setup, call, policy) for name, (setup, call, _) in probes.items()}
            self.record(nbytes, stats, {name: p[2] for name, p in probes.items()}, "3 calls before the lines")
            del probes
        entry = self._cpu[nbytes]
        return entry["copy_gbs"] * 1e9, f"measured copy_ of {nbytes / 2**20:.0f} MiB ({entry['how']})"

    def measurements(self) -> List[dict]:
        return list(self._cpu.values())
