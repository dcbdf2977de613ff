"""Outputs of a run: the JSON document, a markdown report, PNG plots and the short summary table."""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

# 2: adds "bandwidth", implementations' "not_timed", cases' "timed", settings' "interleave", time_s "phases",
# untimed records (status ok, no time_s); readers use .get() for these, so version-1 files still render
SCHEMA_VERSION = 2
REQUIRED_KEYS = ("schema_version", "profile", "created", "environment", "settings", "implementations", "cases",
                 "results")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def write_json(doc: dict, path: Path) -> None:
    path.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _mib(nbytes: Optional[int]) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:.0f}" if nbytes >= 10 * 2**20 else f"{nbytes / 2**20:.2g}"


def _errors(check: dict) -> str:
    return " / ".join(f"{info['max_abs_error']:.1e}" if "max_abs_error" in info else f"{info['rel_error']:.1e}"
                      for info in check.values())


def _cell(record: dict, notes: Dict[str, int]) -> str:
    if record["status"] == "ok" and "time_s" not in record:   # an untimed case: the errors
        return _errors(record.get("check", {}))
    if record["status"] == "ok":
        floor = "" if record.get("pct_floor") is None else f" ({record['pct_floor']:.0f} % of floor)"
        return f"{_ms(record['time_s']['median'])} ms{floor} / {_mib(record.get('peak_bytes'))} MiB"
    reason = f"{record['status']}: {record['reason']}"
    mark = notes.setdefault(reason, len(notes) + 1)
    return f"{record['status']} [{mark}]"


def growth_exponents(results: List[dict], field: str) -> Dict[tuple, float]:
    """Least-squares slope of log(field) against log(N x V) per (case, impl, dtype) over >= 3 measured points
    with different N x V: 1.0 is linear growth."""
    groups = defaultdict(list)
    for r in results:
        if r["status"] != "ok" or "time_s" not in r:
            continue
        value = r["time_s"]["median"] if field == "time" else r.get("peak_bytes")
        if value:
            groups[(r["case"], r["impl"], r["dtype"])].append((math.log(r["n"] * r["v"]), math.log(value)))
    slopes = {}
    for key, pts in groups.items():
        xs = {x for x, _ in pts}
        if len(xs) < 3:
            continue
        mx = sum(x for x, _ in pts) / len(pts)
        my = sum(y for _, y in pts) / len(pts)
        slopes[key] = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    return slopes


def markdown(doc: dict) -> str:
    env, settings = doc["environment"], doc["settings"]
    lines = [f"# aem_kernels benchmark: profile `{doc['profile']}` on {env['device_name']}", ""]
    if doc["profile"] in ("quick", "summary"):
        lines += [f"> **{doc['profile']} profile: a smoke run on tiny shapes. Its timings say nothing about "
                  "performance; use the cpu or gpu profile for that.**", ""]
    lines += [f"- date: {doc['created']}; torch {env['torch']}, triton {env['triton']}, aem_kernels "
              f"{env['aem_kernels']} (commit {env.get('git_commit') or 'unknown'})",
              f"- device: {env['device_name']}; CPU: {env['cpu_model']} ({env['cpu_count']} cores, torch threads "
              f"{env['torch_threads']}); load average at start/end: {env['loadavg_start']} / {env['loadavg_end']}",
              f"- timing: {settings['warmup']} warm-up call(s) after the checked first call, then "
              f"{settings['min_reps']}-{settings['max_reps']} timed calls (at least {settings['min_time_s']} s); "
              "cells show the median time and the peak memory beyond the inputs",
              f"- limits: {settings['max_call_s']} s per call, memory "
              f"{settings['mem_limit_gib'] or 'device limit'} GiB, budget {settings['budget_s']} s; wall time of "
              f"the run {doc['wall_s']:.0f} s", ""]
    if env.get("note"):
        lines[-1:-1] = [f"- note: {env['note']}"]
    switches = {k: v for k, v in (env.get("switches") or {}).items() if v is not None}
    if switches or env.get("cpu_kernel_isa"):
        lines[-1:-1] = [f"- C++ kernels: {env.get('cpu_kernel_isa') or 'not built'}; switches: "
                        + (", ".join(f"{k}={v}" for k, v in switches.items()) or "none")]
    if settings.get("interleave"):
        lines[-1:-1] = ["- interleaved: the lines of a point are timed in rounds, every line once per round"]
    lines += ["## Lines", "", "| line | what it runs | status here |", "|---|---|---|"]
    for impl in doc["implementations"]:
        status = impl["unavailable"] or (f"left out: {impl['excluded']}" if impl.get("excluded") else None)
        status = status or (f"not timed: {impl['not_timed']}" if impl.get("not_timed") else "available")
        lines.append(f"| {impl['name']} | {impl['description']} | {status} |")
    results = doc["results"]
    notes: Dict[str, int] = {}
    absent = {impl["name"] for impl in doc["implementations"] if impl["unavailable"] or impl.get("excluded")}
    not_timed = {impl["name"] for impl in doc["implementations"] if impl.get("not_timed")}
    if absent:
        lines += ["", "The tables below leave out the lines that cannot run in this run (see the reasons above)."]
    for case in doc["cases"]:
        lines += ["", f"## {case['title']} (`{case['name']}`)", ""]
        if not case.get("timed", True):
            lines += ["Untimed: each cell is the max abs error of each output against the reference line "
                      "(log-prob / entropy), from the records' `check`.", ""]
        case_results = [r for r in results if r["case"] == case["name"]]
        sweeps = list(dict.fromkeys(s for r in case_results for s in r["sweeps"]))
        for sweep in sweeps:
            in_sweep = [r for r in case_results if sweep in r["sweeps"]]
            points = list(dict.fromkeys((r["n"], r["v"], r["dtype"]) for r in in_sweep))
            hidden = absent | (not_timed if case.get("timed", True) else set())
            impls = [name for name in dict.fromkeys(r["impl"] for r in in_sweep) if name not in hidden]
            several = len({dt for _, _, dt in points}) > 1
            header = [f"N={n} V={v}" + (f" {dt}" if several else "") for n, v, dt in points]
            lines += [f"**{sweep}**", "", "| line | " + " | ".join(header) + " |",
                      "|---|" + "---|" * len(points)]
            by_key = {(r["impl"], r["n"], r["v"], r["dtype"]): r for r in in_sweep}
            for impl in impls:
                cells = [_cell(by_key[(impl, *p)], notes) for p in points]
                lines.append(f"| {impl} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += _modes_section(results)
    lines += _growth_section(results) + _phase_section(results) + _bandwidth_section(doc)
    lines += _detail_section(results)
    if notes:
        lines += ["", "## Notes (why a line was not timed)", ""]
        lines += [f"{mark}. {reason}" for reason, mark in notes.items()]
    return "\n".join(lines) + "\n"


MODE_CASE = re.compile(r"^aem_loss_fwd_bwd\[(?P<mode>\w+)\]$")


def _modes_section(results: List[dict]) -> List[str]:
    """The per-mode loss cases (`aem_loss_fwd_bwd[<mode>]`) in one table per point: a row per mode, a column
    per line (median ms / peak MiB), the speed-up of our fastest line over eager and over torch.compile (their
    median over ours), and torch.compile's compile time."""
    by_point: Dict[tuple, Dict[str, Dict[str, dict]]] = defaultdict(lambda: defaultdict(dict))
    for r in results:
        match = MODE_CASE.match(r["case"])
        if match:
            by_point[(r["n"], r["v"], r["dtype"])][match["mode"]][r["impl"]] = r
    out = []
    for (n, v, dtype), modes in by_point.items():
        impls = [name for name in dict.fromkeys(i for lines in modes.values() for i in lines)
                 if any(lines.get(name, {}).get("status") == "ok" for lines in modes.values())]
        out += [f"## The loss modes at N={n} V={v} {dtype} (`aem_loss_fwd_bwd[<mode>]`)", "",
                "Each mode's loss, forward + backward: ours, and the framework's own loss on materialised "
                "log-probs (eager, and the whole function under torch.compile). Median ms / peak MiB.", "",
                "| mode | " + " | ".join(impls) + " | speed-up of ours over eager | over torch.compile | compile s |",
                "|---|" + "---|" * (len(impls) + 3)]
        for mode, lines in modes.items():
            cells = [_cell(lines[name], {}) if lines.get(name, {}).get("status") == "ok" else
                     (lines[name]["status"] if name in lines else "-") for name in impls]
            ours = [r["time_s"]["median"] for name, r in lines.items() if name.startswith("aem_kernels")
                    and r["status"] == "ok" and "time_s" in r]
            ratio = (lambda name: f"{lines[name]['time_s']['median'] / min(ours):.2f}x"  # noqa: E731
                     if ours and lines.get(name, {}).get("status") == "ok" else "-")
            compiled = lines.get("torch.compile", {}).get("compile_s")
            cells += [ratio("eager"), ratio("torch.compile"), "-" if compiled is None else f"{compiled:.0f}"]
            out.append(f"| {mode} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def _growth_section(results: List[dict]) -> List[str]:
    time_slopes, mem_slopes = growth_exponents(results, "time"), growth_exponents(results, "memory")
    if not time_slopes:
        return []
    out = ["## Growth with N x V (log-log slope over all measured points; 1.0 = linear)", "",
           "| case | line | dtype | time exponent | memory exponent |", "|---|---|---|---|---|"]
    for key in sorted(time_slopes):
        mem = mem_slopes.get(key)
        out.append(f"| {key[0]} | {key[1]} | {key[2]} | {time_slopes[key]:.2f} | "
                   f"{'n/a' if mem is None else f'{mem:.2f}'} |")
    return out + [""]


def _phase_section(results: List[dict]) -> List[str]:
    """Forward / backward apart, with the speed-ups over eager and torch.compile at the same point."""
    timed = [r for r in results if r["status"] == "ok" and r.get("time_s", {}).get("phases")]
    if not timed:
        return []
    base = {(r["case"], r["n"], r["v"], r["dtype"], r["impl"]): r["time_s"]["median"] for r in timed}
    out = ["## Forward and backward apart (medians)", "",
           "| case | N | V | dtype | line | forward ms | backward ms | total ms | x eager | x torch.compile | "
           "GB/s | % roofline | % floor (fwd) | peak MiB |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in timed:
        key, t = (r["case"], r["n"], r["v"], r["dtype"]), r["time_s"]
        phases = t["phases"]
        speed = [f"{base[(*key, other)] / t['median']:.2f}" if (*key, other) in base else "-"
                 for other in ("eager", "torch.compile")]
        pct = r.get("pct_roofline")
        out.append(f"| {r['case']} | {r['n']} | {r['v']} | {r['dtype']} | {r['impl']} | "
                   f"{_ms(phases['forward']['median']) if 'forward' in phases else '-'} | "
                   f"{_ms(phases['backward']['median']) if 'backward' in phases else '-'} | {_ms(t['median'])} | "
                   f"{speed[0]} | {speed[1]} | {r['achieved_gbs']:.2f} | {'n/a' if pct is None else f'{pct:.1f}'} | "
                   f"{_floor_cell(r)} | {_mib(r.get('peak_bytes'))} |")
    return out + [""]


def _bandwidth_section(doc: dict) -> List[str]:
    rows = doc.get("bandwidth") or []
    if not rows:
        return []
    out = ["## Memory bandwidth (the CPU roofline)", "", "| bytes | copy GB/s (read + write) | read GB/s | how |",
           "|---|---|---|---|"]
    for b in rows:
        read = b.get("read_gbs")
        out.append(f"| {_mib(b['bytes'])} MiB | {b['copy_gbs']:.1f} | {'n/a' if read is None else f'{read:.1f}'} | "
                   f"{b['how']} |")
    return out + [""]


def _detail_section(results: List[dict]) -> List[str]:
    out = ["## Every measured line", "",
           "| case | N | V | dtype | line | median ms | IQR ms | min-max ms | calls | peak MiB | GB/s | % roofline |"
           " % floor (fwd) | worst check |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    timed = [r for r in results if r["status"] == "ok" and "time_s" in r]
    if not timed:
        return []
    for r in timed:
        t = r["time_s"]
        pct = r.get("pct_roofline")
        worst = _worst_check(r.get("check", {}))
        out.append(f"| {r['case']} | {r['n']} | {r['v']} | {r['dtype']} | {r['impl']} | {_ms(t['median'])} | "
                   f"{_ms(t['q1'])}-{_ms(t['q3'])} | {_ms(t['min'])}-{_ms(t['max'])} | {t['n']} | "
                   f"{_mib(r.get('peak_bytes'))} | {r['achieved_gbs']:.2f} | "
                   f"{'n/a' if pct is None else f'{pct:.1f}'} | {_floor_cell(r)} | {worst} |")
    floors = sorted({r["floor_device"] for r in timed if r.get("floor_device")})
    if floors:
        out += ["", "% floor: the time floor (bench/roofline.py: least bytes and FLOPs of the call) over the median "
                "time; in parentheses the forward phase's. Floor: " + "; ".join(floors) + "."]
    return out


def _floor_cell(record: dict) -> str:
    if record.get("pct_floor") is None:
        return "n/a"
    forward = record.get("forward_pct_floor")
    return f"{record['pct_floor']:.1f}" + ("" if forward is None else f" ({forward:.1f})")


def _worst_check(check: dict) -> str:
    parts = []
    for name, info in check.items():
        if "rel_error" in info:
            parts.append(f"{name} {info['rel_error']:.1e}")
        elif "max_abs_error" in info:
            parts.append(f"{name} {info['max_abs_error']:.1e}")
    return ", ".join(parts)


def plots(doc: dict, out_dir: Path, name: Optional[str] = None) -> List[Path]:
    """Per case and N sweep: time vs N and peak memory vs N, one line per implementation (log-log); files
    `<name>_<case>_<sweep>.png`, name the profile's by default."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import FixedLocator, ScalarFormatter

    written = []
    results = [r for r in doc["results"] if r["status"] == "ok" and "time_s" in r]
    # one colour per line across every figure; ours solid with circles, the others dashed with squares
    palette = plt.get_cmap("tab10").colors + plt.get_cmap("Dark2").colors
    colour = {impl["name"]: palette[i % len(palette)] for i, impl in enumerate(doc["implementations"])}
    for case in doc["cases"]:
        sweeps = dict.fromkeys(s for r in doc["results"] if r["case"] == case["name"] for s in r["sweeps"]
                               if s.startswith("N sweep"))
        for sweep in sweeps:
            rows = [r for r in results if r["case"] == case["name"] and sweep in r["sweeps"]]
            if len({r["n"] for r in rows}) < 2:   # no points, or one (the per-mode loss cases): nothing to plot
                continue
            fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
            for impl in dict.fromkeys(r["impl"] for r in rows):
                pts = sorted((r["n"], r["time_s"], r.get("peak_bytes")) for r in rows if r["impl"] == impl)
                style = "-o" if impl.startswith("aem_kernels") else "--s"
                ns = [p[0] for p in pts]
                med = [p[1]["median"] * 1e3 for p in pts]
                err = [[m - p[1]["q1"] * 1e3 for m, p in zip(med, pts)], [p[1]["q3"] * 1e3 - m for m, p in zip(med, pts)]]
                ax_t.errorbar(ns, med, yerr=err, fmt=style, label=impl, capsize=2, markersize=4, color=colour.get(impl))
                mem = [(n, p / 2**20) for n, _, p in pts if p]
                if mem:
                    ax_m.plot([m[0] for m in mem], [m[1] for m in mem], style, label=impl, markersize=4,
                              color=colour.get(impl))
            all_ns = sorted({r["n"] for r in doc["results"] if r["case"] == case["name"] and sweep in r["sweeps"]})
            for ax, ylabel in ((ax_t, "median time per call (ms), bars: IQR"), (ax_m, "peak memory beyond inputs (MiB)")):
                ax.set_xscale("log", base=2)
                ax.xaxis.set_major_locator(FixedLocator(all_ns))
                ax.xaxis.set_major_formatter(ScalarFormatter())
                ax.xaxis.set_minor_locator(FixedLocator([]))
                ax.set_yscale("log")
                ax.set_xlabel("N (tokens)")
                ax.set_ylabel(ylabel)
                ax.grid(True, which="both", alpha=0.3)
            ax_m.legend(fontsize=8)
            for ax in (ax_t, ax_m):
                ax.set_xlim(all_ns[0] / 1.3, all_ns[-1] * 1.3)
            fig.text(0.01, 0.01, f"a line missing at a point was not timed there; the reasons are in "
                     f"{name or doc['profile']}.md",
                     fontsize=7, alpha=0.7)
            fig.suptitle(f"{case['title']} - {sweep} - {doc['environment']['device_name']} ({doc['profile']} profile)",
                         fontsize=10)
            fig.tight_layout()
            path = out_dir / f"{name or doc['profile']}_{case['name']}_{slug(sweep)}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def summary_table(doc: dict) -> str:
    """A short table: per line that ran, median time and peak memory of each case and the speed-up over
    eager; then one line per implementation that could not run, with the reason."""
    results, cases = doc["results"], doc["cases"]
    untimed_only = all(not c.get("timed", True) for c in cases)
    absent = {impl["name"]: impl["unavailable"] or impl.get("excluded") or impl.get("not_timed")
              for impl in doc["implementations"]
              if impl["unavailable"] or impl.get("excluded") or (impl.get("not_timed") and not untimed_only)}
    eager = {(r["case"], r["n"], r["v"], r["dtype"]): r for r in results if r["impl"] == "eager" and r["status"] == "ok"}
    out = ["| line | " + " | ".join(f"{c['title']}: ms / peak MiB / speed-up vs eager" for c in cases) + " |",
           "|---|" + "---|" * len(cases)]
    for impl in dict.fromkeys(r["impl"] for r in results):
        if impl in absent:
            continue
        cells = []
        for case in cases:
            r = next((r for r in results if r["impl"] == impl and r["case"] == case["name"]), None)
            if r is None:
                cells.append("-")
            elif r["status"] != "ok":
                cells.append(f"{r['status']}: {r['reason']}")
            elif "time_s" not in r:
                cells.append(_errors(r.get("check", {})))
            else:
                base = eager.get((r["case"], r["n"], r["v"], r["dtype"]))
                speed = f"{base['time_s']['median'] / r['time_s']['median']:.2f}x" if base else "-"
                floor = "" if r.get("pct_floor") is None else f" ({r['pct_floor']:.0f} % of floor)"
                cells.append(f"{_ms(r['time_s']['median'])}{floor} / {_mib(r.get('peak_bytes'))} / {speed}")
        out.append(f"| {impl} | " + " | ".join(cells) + " |")
    if absent:
        out += ["", "Not run here:"] + [f"- {name}: {reason}" for name, reason in absent.items()]
    return "\n".join(out)
