"""The measurement loop: every point of a profile, every case, every line, into one list of records.

`run_profile(BenchContext(...))`: the context holds everything a run needs (device, profile: points, cases,
timing and limits; the lines; the reference line; exclusions; the roofline; the seed; the log sink).

For each point (ascending N x V) the logits are built once; for each case the reference line (our torch
backend, or the case's own) runs first and its outputs become the reference. Every other line then:
  1. is skipped, with the reason, when it is unavailable, excluded, not applicable to the case, predicted to
     exceed the profile's per-call time or memory limit, or when the profile's time budget is spent;
  2. runs once under the memory probe (its peak memory; for torch.compile after a first, compiling call whose
     time is reported as compile_s), and its outputs are compared with the reference (`checks.py`): a line
     that disagrees is reported, not timed;
  3. is timed (`measure.Timer`: warm-up calls, then the timed calls), right after its check, or, when the
     profile's timing interleaves, together with the case's other lines in rounds once all are checked.
An untimed case (the precision table) stops after step 2. A record is written for every (point, case, line),
whatever happened, so the results list every line (a case confined to some points by `Profile.case_points` has
records at those points only).
"""

from __future__ import annotations

import gc
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import checks, measure
from .measure import BandwidthRoofline
from .cases import CASES, DEFAULT_CASES, Case, Inputs, Point
from .cases.base import make_logits
from .lines import Implementation
from .profiles import Profile
from .roofline import Device, percent_of_floor

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


def _log_to_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class BenchContext:
    """Everything one run of the benchmark needs, passed as one object.

    device      where the tensors live
    profile     the points (N, V, dtype: `profile.sweeps`), the cases, the timing policy and the limits
    lines       every line (ours and the competitors, and the cases' own lines)
    reference   the line the others are checked against (a case may name another: `Case.reference_for`)
    excluded    line name -> why this run leaves it out (recorded as skipped with that reason)
    roofline    the device bandwidth for the roofline (a `BandwidthRoofline` of `device` by default)
    floor       (device, note): the rates whose time floor (`bench.roofline`) each timed line is compared
                with (achieved % of the floor); None: no floor (the CPU, unless --floor names one)
    seed        seeds every input
    log         the sink of the progress lines (stderr by default)
    """

    device: torch.device
    profile: Profile
    lines: List[Implementation]
    reference: Implementation
    excluded: Dict[str, str] = field(default_factory=dict)
    roofline: Optional[BandwidthRoofline] = None
    floor: Optional[Tuple[Device, str]] = None
    seed: int = 0
    log: Callable[[str], None] = _log_to_stderr

    def __post_init__(self) -> None:
        if self.roofline is None:
            self.roofline = BandwidthRoofline(self.device)

    @property
    def cases(self) -> List[Case]:
        return [CASES[name] for name in (self.profile.cases or DEFAULT_CASES)]


class _Run:
    """The state of one run: its context, limits, predictor and timer, and the elapsed-time log."""

    def __init__(self, ctx: BenchContext) -> None:
        self.ctx = ctx
        self.limits = Limits(ctx.profile.max_call_s, ctx.profile.mem_limit_bytes, ctx.profile.budget_s,
                             time.perf_counter())
        self.predictor = Predictor()
        self.timer = measure.Timer(ctx.device)

    def log(self, msg: str) -> None:
        self.ctx.log(f"{time.perf_counter() - self.limits.started:7.0f}s {msg}")


@dataclass
class _Cell:
    """One (case, point): its inputs, its reference line and that line's outputs and peak memory."""

    case: Case
    point: Point
    sweeps: List[str]
    inputs: Optional[Inputs] = None
    reference: Optional[Implementation] = None
    reference_outputs: Optional[dict] = None
    reference_peak: Optional[int] = None

    def record(self, line: Implementation, status: str, reason: Optional[str] = None, **fields) -> dict:
        assert status in STATUSES
        return {"case": self.case.name, "impl": line.name, "n": self.point.n, "v": self.point.v,
                "dtype": self.point.dtype, "seq_len": self.point.seq_len, "sweeps": self.sweeps, "status": status,
                "reason": reason, **fields}


def _release(device: torch.device, collect: bool = False) -> None:
    if collect:   # a full collection costs ~0.5 s once dynamo is loaded: once per point, not per line
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_profile(ctx: BenchContext) -> List[dict]:
    run = _Run(ctx)
    cases, lines, device = ctx.cases, ctx.lines, ctx.device
    membership: Dict[Tuple[int, int, str], List[str]] = {}
    for sweep in ctx.profile.sweeps:
        for key in sweep.points:
            membership.setdefault(key, []).append(sweep.name)
    points = sorted(membership, key=lambda k: (k[0] * k[1], k[2], k[0]))
    records: List[dict] = []
    for n, v, dtype in points:
        point = Point(n=n, v=v, dtype=dtype, seq_len=ctx.profile.seq_len)
        sweeps = membership[(n, v, dtype)]
        # a case the profile confines to some points (`Profile.case_points`) has no record elsewhere
        here = [case for case in cases if ctx.profile.runs_at(case.name, (n, v, dtype))]
        if not run.limits.budget_left():
            reason = "profile time budget exhausted"
            records += [_Cell(c, point, sweeps).record(line, "skipped", reason) for c in here for line in lines]
            run.log(f"[{point.key()}] skipped: {reason}")
            continue
        cache: Dict[str, Inputs] = {}

        def base_inputs() -> Inputs:   # built on first use: a point where every line is skipped builds nothing
            if "logits" not in cache:
                cache["logits"] = make_logits(point, device, ctx.seed)
            return cache["logits"]

        for case in here:
            cell = _Cell(case, point, sweeps)
            # alive during the case: the logits, and for a backward a kept copy and the reference gradient
            resident = point.logits_bytes * (3 if case.backward else 1)
            if run.limits.mem_limit_bytes is not None and resident > run.limits.mem_limit_bytes:
                reason = (f"the inputs and the reference outputs alone take {resident / 2**30:.2f} GiB > the "
                          f"enforced {run.limits.mem_limit_bytes / 2**30:.1f} GiB memory limit")
                records += [cell.record(line, "skipped", reason) for line in lines]
                run.log(f"[{point.key()}] {case.name}: skipped: {reason}")
                continue

            def case_inputs(case: Case = case) -> Inputs:
                base = base_inputs() if case.shared_logits and case.input_kind == "logits" else None
                return case.extend(base, point, device, ctx.seed)

            records += _run_case(run, cell, case_inputs)
            _release(device)
        cache.clear()
        _release(device, collect=True)
    return records


def _static_skip(run: _Run, cell: _Cell, line: Implementation) -> Optional[str]:
    case, point = cell.case, cell.point
    return (run.ctx.excluded.get(line.name) or line.unavailable or case.skip_reason(line)
            or (run.predictor.skip_reason((case.name, line.name, point.dtype), point.n * point.v,
                                          point.logits_bytes, run.limits) if case.timed else None))


def _run_case(run: _Run, cell: _Cell, make_inputs: Callable[[], Inputs]) -> List[dict]:
    ctx, case, point = run.ctx, cell.case, cell.point
    cell.reference = case.reference_for(ctx.reference)
    static = {line.name: _static_skip(run, cell, line) for line in ctx.lines}
    if all(static.values()):   # nothing to measure here: do not pay for the reference either
        return [cell.record(line, "skipped", static[line.name]) for line in ctx.lines]
    cell.inputs = make_inputs()
    try:
        state = case.prepare(cell.reference, cell.inputs, fresh=False)
        cell.reference_outputs, cell.reference_peak = measure.peak_memory(
            ctx.device, lambda: case.call(cell.reference, state))
        state = None   # release the reference inputs before the lines run
    except Exception as exc:  # the reference failing makes every check impossible: record it everywhere
        reason = f"the reference line {cell.reference.name} failed: {type(exc).__name__}: {exc}"
        run.log(f"[{point.key()}] {case.name}: {reason}")
        _release(ctx.device)
        status = "skipped" if _is_oom(exc) else "error"
        return [cell.record(line, status, static[line.name] or reason) for line in ctx.lines]
    interleave = case.timed and ctx.profile.timing.interleave
    records: Dict[str, dict] = {}
    checked: List[Tuple[Implementation, dict]] = []   # (line, fields so far): passed the check, to be timed
    for line in ctx.lines:
        reason = static[line.name] or (None if run.limits.budget_left() else "profile time budget exhausted")
        if reason:
            records[line.name] = cell.record(line, "skipped", reason)
            continue
        outcome = _check_line(run, cell, line)
        if isinstance(outcome, dict) and "status" in outcome:
            records[line.name] = outcome
        elif not case.timed:
            records[line.name] = cell.record(line, "ok", None, **outcome)
        elif interleave:
            checked.append((line, outcome))
        else:
            records[line.name] = _finish(run, cell, line, outcome, _time_one(run, cell, line))
        if line.name in records:
            _log_record(run, cell, records[line.name])
    if checked:
        for (line, fields), stats in zip(checked, _time_interleaved(run, cell, [line for line, _ in checked])):
            records[line.name] = _finish(run, cell, line, fields, stats)
            _log_record(run, cell, records[line.name])
    return [records[line.name] for line in ctx.lines]


def _prepare(cell: _Cell, line: Implementation) -> Callable[[], Inputs]:
    return lambda: cell.case.prepare(line, cell.inputs, fresh=line.mutates_inputs)


def _call(cell: _Cell, line: Implementation) -> Callable[[Inputs], dict]:
    return lambda state: cell.case.call(line, state)


def _failure(run: _Run, cell: _Cell, line: Implementation, exc: BaseException, **fields) -> dict:
    _release(run.ctx.device)
    if _is_oom(exc):
        return cell.record(line, "skipped", f"out of memory: {str(exc).splitlines()[0]}", oom=True, **fields)
    return cell.record(line, "error", f"{type(exc).__name__}: {exc}", **fields)


def _check_line(run: _Run, cell: _Cell, line: Implementation) -> dict:
    """The checked first call: its peak memory and its outputs against the reference. Returns the fields so
    far ("check", "peak_bytes", "compile_s") when the line agrees, else its finished record (with "status")."""
    device = run.ctx.device
    prepare, call = _prepare(cell, line), _call(cell, line)
    fields: dict = {}
    try:
        if line is not cell.reference:
            state = prepare()
            if line.compiled:   # compile first, outside the memory probe
                began = time.perf_counter()
                outputs = call(state)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                fields["compile_s"] = time.perf_counter() - began
                state = prepare() if line.mutates_inputs else state
                del outputs
            outputs, peak = measure.peak_memory(device, lambda: call(state))
            del state
        else:
            outputs, peak = cell.reference_outputs, cell.reference_peak
        passed, check = checks.compare(outputs, cell.reference_outputs, cell.case.tolerance_scale(cell.point))
        del outputs
    except Exception as exc:
        return _failure(run, cell, line, exc, **fields)
    fields.update(check=check, peak_bytes=peak)
    if not passed:
        failed = ", ".join(f"{name}: {info}" for name, info in check.items() if not info["passed"])
        return cell.record(line, "disagrees", f"outside tolerance ({failed})", **fields)
    return fields


def _time_one(run: _Run, cell: _Cell, line: Implementation):
    try:
        return run.timer.run(_prepare(cell, line), _call(cell, line), run.ctx.profile.timing)
    except Exception as exc:
        return exc


def _time_interleaved(run: _Run, cell: _Cell, lines: List[Implementation]) -> list:
    """The lines' statistics (or exceptions), timed in rounds; on the CPU the memory copy and read probes of
    the roofline join the rounds, and their bandwidth becomes this point's roofline."""
    ctx = run.ctx
    entries = {line.name: (_prepare(cell, line), _call(cell, line)) for line in lines}
    probes = {}
    if ctx.roofline.measured:
        nbytes = ctx.roofline.probe_bytes(cell.point)
        probes = measure.bandwidth_probes(nbytes, ctx.device)
        entries.update({name: (setup, call) for name, (setup, call, _) in probes.items()})
    results = run.timer.run_interleaved(entries, ctx.profile.timing)
    if probes and all(isinstance(results[name], dict) for name in probes):
        ctx.roofline.record(nbytes, {name: results[name] for name in probes},
                            {name: p[2] for name, p in probes.items()},
                            f"interleaved with the lines of {cell.case.name} at {cell.point.key()}")
    return [results[line.name] for line in lines]


def _finish(run: _Run, cell: _Cell, line: Implementation, fields: dict, stats) -> dict:
    """The record of a checked line from its timing statistics (or the exception its timing raised)."""
    if isinstance(stats, BaseException):
        return _failure(run, cell, line, stats, **fields)
    traffic = cell.case.traffic_bytes(cell.point)
    bandwidth, roof_source = run.ctx.roofline.bytes_per_s(cell.point)
    achieved = traffic / stats["median"]
    record = cell.record(line, "ok", None, time_s=stats, traffic_bytes=traffic, achieved_gbs=achieved / 1e9,
                         roofline_gbs=bandwidth / 1e9 if bandwidth else None, roofline_source=roof_source,
                         pct_roofline=100 * achieved / bandwidth if bandwidth else None, **fields)
    record.update(_floor_fields(run.ctx.floor, cell, stats))
    run.predictor.record((cell.case.name, line.name, cell.point.dtype), cell.point.n * cell.point.v,
                         stats["median"], fields.get("peak_bytes"))
    return record


def _floor_fields(floor: Optional[Tuple[Device, str]], cell: _Cell, stats: dict) -> dict:
    """The time floor of the call (and of its forward phase) on the run's floor device, and the achieved %."""
    if floor is None:
        return {}
    device, note = floor
    fields: dict = {}
    work = cell.case.work(cell.point)
    if work is not None:
        seconds, bound = work.floor_s(device)
        fields.update(floor_s=seconds, floor_bound=bound, floor_device=note, flops=work.flops,
                      pct_floor=percent_of_floor(seconds, stats["median"]))
    forward = cell.case.work(cell.point, phase="forward")
    phase = stats.get("phases", {}).get("forward")
    if forward is not None and phase is not None and phase["median"] > 0:
        seconds, _ = forward.floor_s(device)
        fields.update(forward_floor_s=seconds, forward_pct_floor=percent_of_floor(seconds, phase["median"]))
    return fields


def _log_record(run: _Run, cell: _Cell, record: dict) -> None:
    if record.get("oom"):
        run.predictor.record_oom((cell.case.name, record["impl"], cell.point.dtype), cell.point)
    if record["status"] == "ok" and "time_s" in record:
        shown = f"{record['time_s']['median'] * 1e3:9.2f} ms"
        if record.get("pct_floor") is not None:
            shown += f" {record['pct_floor']:5.1f} % of floor"
        if record.get("forward_pct_floor") is not None:
            shown += (f" (forward {record['time_s']['phases']['forward']['median'] * 1e3:.2f} ms, "
                      f"{record['forward_pct_floor']:.1f} %)")
    elif record["status"] == "ok":
        shown = "checked: " + ", ".join(f"{name} {info.get('max_abs_error', info.get('rel_error')):.2e}"
                                        for name, info in record["check"].items())
    else:
        shown = f"{record['status']}: {record['reason']}"
    run.log(f"[{cell.point.key()}] {cell.case.name:18s} {record['impl']:28s} {shown}")
