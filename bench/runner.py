"""The measurement loop: every point of a profile, every case, every line, into one list of records.

For each point (ascending N x V) the logits are built once; for each case the reference line (our torch
backend) runs first and its outputs become the reference. Every other line then:
  1. is skipped, with the reason, when it is unavailable, excluded, not applicable to the case, predicted to
     exceed the profile's per-call time or memory limit, or when the profile's time budget is spent;
  2. runs once under the memory probe (its peak memory; for torch.compile after a first, compiling call whose
     time is reported as compile_s), and its outputs are compared with the reference (`checks.py`): a line
     that disagrees is reported, not timed;
  3. is timed (`measure.Timer`: warm-up calls, then the timed calls).
A record is written for every (point, case, line), whatever happened, so the results list every line.
"""

from __future__ import annotations

import gc
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import checks, measure
from .cases import CASES, Case, Inputs, Point
from .cases.base import make_logits
from .implementations import Implementation
from .profiles import Profile

STATUSES = ("ok", "skipped", "disagrees", "error")


@dataclass
class Limits:
    max_call_s: float
    mem_limit_bytes: Optional[int]
    budget_s: Optional[float]
    started: float

    def budget_left(self) -> bool:
        return self.budget_s is None or time.perf_counter() - self.started < self.budget_s


class Predictor:
    """Per (case, line, dtype): predicts time per call and peak memory at a larger point in proportion to N x V
    from the largest points measured so far (the slowest of those within 20 % of the largest N x V, so noise
    errs on the side of running less); remembers where a line ran out of memory. A slope fitted between two
    points is not used: points of nearly equal N x V from different sweeps (512 x 32000 and 128 x 128256)
    turned timing noise into predictions off by 100x."""

    def __init__(self) -> None:
        self._seen: Dict[Tuple[str, str, str], Dict[int, Tuple[float, Optional[int]]]] = {}
        self._oom: Dict[Tuple[str, str, str], str] = {}

    def record(self, key, elements: int, seconds: float, peak: Optional[int]) -> None:
        self._seen.setdefault(key, {})[elements] = (seconds, peak)

    def record_oom(self, key, point: Point) -> None:
        self._oom.setdefault(key, point.key())

    @staticmethod
    def _extrapolate(points: List[Tuple[int, float]], elements: int) -> float:
        largest = max(x for x, _ in points)
        return max(y * elements / x for x, y in points if x >= 0.8 * largest)

    def skip_reason(self, key, elements: int, logits_bytes: int, limits: Limits) -> Optional[str]:
        if key in self._oom:
            return f"ran out of memory at a smaller point ({self._oom[key]})"
        seen = sorted(self._seen.get(key, {}).items())
        if not seen:
            return None
        reasons = []
        peaks = [(x, peak) for x, (_, peak) in seen if peak is not None]
        if limits.mem_limit_bytes is not None and peaks:
            peak = self._extrapolate(peaks, elements)
            if logits_bytes + peak > limits.mem_limit_bytes:
                reasons.append(f"predicted memory {(logits_bytes + peak) / 2**30:.2f} GiB (logits + peak "
                               f"{peak / 2**30:.2f} GiB) > the enforced {limits.mem_limit_bytes / 2**30:.1f} GiB limit")
        seconds = self._extrapolate([(x, t) for x, (t, _) in seen], elements)
        if seconds > limits.max_call_s:
            reasons.append(f"predicted {seconds:.1f} s per call > the profile's {limits.max_call_s:g} s limit")
        if not reasons:
            return None
        return "; ".join(reasons) + f" (extrapolated in N x V from the measured points up to {seen[-1][0]:,} logits)"


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


class BandwidthRoofline:
    """The device's bandwidth in bytes/s: the HBM peak on CUDA, a measured copy_ on the CPU (per logits
    size, capped at 1 GiB: far beyond any last-level cache, so the figure no longer depends on it)."""

    def __init__(self, device: torch.device, peak_override: Optional[float]) -> None:
        self.device = device
        self.override = peak_override
        self._cpu: Dict[int, float] = {}

    def bytes_per_s(self, point: Point) -> Tuple[Optional[float], str]:
        if self.override:
            return self.override, "given by --peak-gbs"
        if self.device.type == "cuda":
            peak = measure.gpu_peak_bandwidth(self.device)
            return peak, "HBM datasheet peak" if peak else "unknown device (pass --peak-gbs)"
        nbytes = min(point.logits_bytes, 1 << 30)
        if nbytes not in self._cpu:
            self._cpu[nbytes] = measure.cpu_copy_bandwidth(nbytes)
        return self._cpu[nbytes], f"measured copy_ of {nbytes / 2**20:.0f} MiB"


def _record(case: Case, line: Implementation, point: Point, sweeps: List[str], status: str,
            reason: Optional[str] = None, **fields) -> dict:
    assert status in STATUSES
    return {"case": case.name, "impl": line.name, "n": point.n, "v": point.v, "dtype": point.dtype,
            "seq_len": point.seq_len, "sweeps": sweeps, "status": status, "reason": reason, **fields}


def _release(device: torch.device, collect: bool = False) -> None:
    if collect:   # a full collection costs ~0.5 s once dynamo is loaded: once per point, not per line
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_profile(profile: Profile, lines: List[Implementation], reference: Implementation, device: torch.device,
                excluded: Dict[str, str], roofline: BandwidthRoofline, seed: int = 0,
                log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True)) -> List[dict]:
    limits = Limits(profile.max_call_s, profile.mem_limit_bytes, profile.budget_s, time.perf_counter())
    say = log
    log = lambda msg: say(f"{time.perf_counter() - limits.started:7.0f}s {msg}")  # noqa: E731
    cases = [CASES[name] for name in (profile.cases or CASES)]
    timer = measure.Timer(device)
    predictor = Predictor()
    membership: Dict[Tuple[int, int, str], List[str]] = {}
    for sweep in profile.sweeps:
        for key in sweep.points:
            membership.setdefault(key, []).append(sweep.name)
    points = sorted(membership, key=lambda k: (k[0] * k[1], k[2], k[0]))
    records: List[dict] = []
    for n, v, dtype in points:
        point = Point(n=n, v=v, dtype=dtype, seq_len=profile.seq_len)
        sweeps = membership[(n, v, dtype)]
        if not limits.budget_left():
            reason = "profile time budget exhausted"
            records += [_record(c, line, point, sweeps, "skipped", reason) for c in cases for line in lines]
            log(f"[{point.key()}] skipped: {reason}")
            continue
        cache: Dict[str, Inputs] = {}

        def base_inputs() -> Inputs:   # built on first use: a point where every line is skipped builds nothing
            if "logits" not in cache:
                cache["logits"] = make_logits(point, device, seed)
            return cache["logits"]

        for case in cases:
            # alive during the case: the logits, and for a backward a kept copy and the reference gradient
            resident = point.logits_bytes * (3 if case.backward else 1)
            if limits.mem_limit_bytes is not None and resident > limits.mem_limit_bytes:
                reason = (f"the inputs and the reference outputs alone take {resident / 2**30:.2f} GiB > the "
                          f"enforced {limits.mem_limit_bytes / 2**30:.1f} GiB memory limit")
                records += [_record(case, line, point, sweeps, "skipped", reason) for line in lines]
                log(f"[{point.key()}] {case.name}: skipped: {reason}")
                continue
            def case_inputs() -> Inputs:
                if case.input_kind == "hidden":   # hidden states and a classifier, built from the point
                    return case.make_inputs(point, device, seed)
                return case.extend(base_inputs(), device, seed)

            records += _run_case(case, point, sweeps, case_inputs, lines, reference, excluded, limits, predictor,
                                 timer, profile, lambda: roofline.bytes_per_s(point), device, log)
            _release(device)
        cache.clear()
        _release(device, collect=True)
    return records


def _run_case(case, point, sweeps, make_inputs: Callable[[], Inputs], lines, reference, excluded, limits, predictor,
              timer, profile, roofline: Callable, device, log) -> List[dict]:
    reference = case.reference_for(reference)
    static = {line.name: (excluded.get(line.name) or line.unavailable or case.skip_reason(line)
                          or predictor.skip_reason((case.name, line.name, point.dtype), point.n * point.v,
                                                   point.logits_bytes, limits)) for line in lines}
    if all(static.values()):   # nothing to measure here: do not pay for the reference either
        return [_record(case, line, point, sweeps, "skipped", static[line.name]) for line in lines]
    inputs, roof = make_inputs(), roofline()
    try:
        state = case.prepare(reference, inputs, fresh=False)
        reference_outputs, reference_peak = measure.peak_memory(device, lambda: case.call(reference, state))
        state = None   # release the reference inputs before the lines run
    except Exception as exc:  # the reference failing makes every check impossible: record it everywhere
        reason = f"the reference line {reference.name} failed: {type(exc).__name__}: {exc}"
        log(f"[{point.key()}] {case.name}: {reason}")
        _release(device)
        status = "skipped" if _is_oom(exc) else "error"
        return [_record(case, line, point, sweeps, status, static[line.name] or reason) for line in lines]
    records = []
    for line in lines:
        reason = static[line.name] or (None if limits.budget_left() else "profile time budget exhausted")
        if reason:
            records.append(_record(case, line, point, sweeps, "skipped", reason))
            continue
        record = _measure_line(case, line, point, sweeps, inputs, reference, (reference_outputs, reference_peak),
                               timer, profile, roof, device)
        key = (case.name, line.name, point.dtype)
        if record["status"] == "ok":
            predictor.record(key, point.n * point.v, record["time_s"]["median"], record.get("peak_bytes"))
        elif record.get("oom"):
            predictor.record_oom(key, point)
        records.append(record)
        shown = (f"{record['time_s']['median'] * 1e3:9.2f} ms" if record["status"] == "ok"
                 else f"{record['status']}: {record['reason']}")
        log(f"[{point.key()}] {case.name:18s} {line.name:28s} {shown}")
    return records


def _measure_line(case, line, point, sweeps, inputs, reference, reference_result, timer, profile, roof,
                  device) -> dict:
    prepare = lambda: case.prepare(line, inputs, fresh=line.mutates_inputs)  # noqa: E731
    call = lambda state: case.call(line, state)  # noqa: E731
    reference_outputs, peak = reference_result
    extra: dict = {}
    try:
        if line is not reference:
            state = prepare()
            began = time.perf_counter()
            if line.compiled:   # compile first, outside the memory probe
                outputs = call(state)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                extra["compile_s"] = time.perf_counter() - began
                state = prepare() if line.mutates_inputs else state
                del outputs
            outputs, peak = measure.peak_memory(device, lambda: call(state))
            del state
        else:
            outputs = reference_outputs
        passed, check = checks.compare(outputs, reference_outputs)
        del outputs
        extra["check"] = check
        if not passed:
            failed = ", ".join(f"{name}: {info}" for name, info in check.items() if not info["passed"])
            return _record(case, line, point, sweeps, "disagrees", f"outside tolerance ({failed})", **extra)
        stats = timer.run(prepare, call, profile.timing)
    except Exception as exc:
        _release(device)
        if _is_oom(exc):
            return _record(case, line, point, sweeps, "skipped", f"out of memory: {str(exc).splitlines()[0]}",
                           oom=True, **extra)
        return _record(case, line, point, sweeps, "error", f"{type(exc).__name__}: {exc}", **extra)
    traffic = case.traffic_bytes(point)
    bandwidth, roof_source = roof
    achieved = traffic / stats["median"]
    return _record(case, line, point, sweeps, "ok", None, time_s=stats, peak_bytes=peak, traffic_bytes=traffic, achieved_gbs=achieved / 1e9,
                   roofline_gbs=bandwidth / 1e9 if bandwidth else None, roofline_source=roof_source,
                   pct_roofline=100 * achieved / bandwidth if bandwidth else None, **extra)
