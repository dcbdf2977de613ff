"""Markdown tables of trainer runs: success rate at fixed steps and the entropy trajectory, mean +- std over
seeds, per environment and method (the table committed as bench/results/trainer/summary.md); every method's
paired difference against GRPO with its bootstrap interval and the design's minimal detectable effect, and
the drift meter's validation (predicted D against the measured entropy change). The statistics and their
protocol are in `stats.py`, fixed before the runs."""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

from .plots import METHOD_STYLE, Runs, drift_points, load_runs, series
from .stats import PERMUTATIONS, drift_validation, paired_comparison

__all__ = ["summary_tables", "write_summary"]


def _fmt(values: np.ndarray, digits: int = 2) -> str:
    if values.size == 0:
        return "-"
    return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"


def _checkpoints(steps: np.ndarray, count: int = 5) -> List[int]:
    """Up to `count` logged steps spread evenly over the run (always the first and the last)."""
    if steps.size == 0:
        return []
    picks = np.linspace(0, len(steps) - 1, min(count, len(steps))).round().astype(int)
    return [int(steps[i]) for i in sorted(set(picks))]


def _window_mean(seeds, key: str, at: int, half: int) -> np.ndarray:
    """Per seed, the mean of a training metric over steps [at - half, at + half] (clipped to the run)."""
    steps, values = series(seeds, key, "train")
    if steps.size == 0:
        return np.array([])
    sel = (steps >= at - half) & (steps <= at + half)
    return values[:, sel].mean(1)


def summary_tables(runs: Runs, window: int = 5) -> str:
    """The markdown text: per environment, a success table and an entropy table."""
    out: List[str] = []
    for env in sorted({env for env, _ in runs}):
        methods = [m for m in METHOD_STYLE if (env, m) in runs]
        eval_steps, _ = series(runs[(env, methods[0])], "eval/success", "eval")
        marks = _checkpoints(eval_steps, count=8)
        out.append(f"### {env}\n")
        out.append("Held-out success rate (one sampled trajectory per task on the fixed evaluation set) after N RL "
                   "steps, its mean over the evaluations after step 0, and the rollout success over the last 10 "
                   "steps (mean ± std over seeds):\n")
        out.append("| method | seeds | " + " | ".join(f"step {m}" for m in marks) +
                   " | mean after 0 | rollout, last 10 |")
        out.append("|---|---|" + "---|" * (len(marks) + 2))
        finals: Dict[str, np.ndarray] = {}
        averages: Dict[str, np.ndarray] = {}
        for method in methods:
            seeds = runs[(env, method)]
            steps, values = series(seeds, "eval/success", "eval")
            cells = [_fmt(values[:, list(steps).index(m)]) for m in marks]
            finals[method] = values[:, -1]
            averages[method] = values[:, 1:].mean(1) if values.shape[1] > 1 else values[:, -1]
            cells += [_fmt(averages[method]), _fmt(_last_mean(seeds, "rollout/success", 10))]
            out.append(f"| {METHOD_STYLE[method][0]} | {len(seeds)} | " + " | ".join(cells) + " |")
        out += _paired_section(runs, env, methods, finals, averages)
        out.append("")
        train_steps, _ = series(runs[(env, methods[0])], "policy/token_entropy", "train")
        tmarks = _checkpoints(train_steps)
        out.append(f"Entropy trajectory (rollout policy, mean over a ±{window // 2}-step window):\n")
        out.append("| method | quantity | " + " | ".join(f"step {m}" for m in tmarks) + " |")
        out.append("|---|---|" + "---|" * len(tmarks))
        for method in methods:
            seeds = runs[(env, method)]
            for key, name in (("policy/token_entropy", "token entropy"),
                              ("policy/response_entropy", "response entropy"),
                              ("aem/drift", "predicted drift D"), ("aem/w_std", "weight std")):
                cells = [_fmt(_window_mean(seeds, key, m, window // 2), 3) for m in tmarks]
                out.append(f"| {METHOD_STYLE[method][0]} | {name} | " + " | ".join(cells) + " |")
        out.append("")
        out += _drift_section(runs, env, methods)
    return "\n".join(out)


def _paired_section(runs: Runs, env: str, methods: Sequence[str], finals: Dict[str, np.ndarray],
                    averages: Dict[str, np.ndarray]) -> List[str]:
    """Every method against GRPO, and every "<mode>_aem" against its "<mode>", paired by seed (the protocol of
    stats.py)."""
    rollout = {m: _last_mean(runs[(env, m)], "rollout/success", 10) for m in methods}
    out: List[str] = []
    against_grpo = [(m, "grpo") for m in methods if m != "grpo"] if "grpo" in methods else []
    against_base = [(m, m[:-4]) for m in methods if m.endswith("_aem") and m[:-4] in methods]
    for pairs, title in ((against_grpo, "against GRPO"), (against_base, "of AEM against the same loss mode without it")):
        if not pairs:
            continue
        out += [f"\nPaired differences {title} (same seed: same warm start, same first batch); mean difference, "
                "95 % bootstrap interval over seeds (10^4 resamples), seeds better / worse / tied, and the minimal "
                "detectable effect (MDE: 80 % power, two-sided 5 %, at the observed spread of the differences):\n",
                "| method | against | outcome | seeds | difference [95 % CI] | better / worse / tied | MDE | verdict |",
                "|---|---|---|---|---|---|---|---|"]
        for method, base in pairs:
            label, base_label = METHOD_STYLE[method][0], METHOD_STYLE[base][0]
            for name, values in (("mean held-out success after step 0 (primary)", averages),
                                 ("final held-out success", finals), ("rollout success, last 10 steps", rollout)):
                if len(values[method]) != len(values[base]) or len(values[method]) < 2:
                    out.append(f"| {label} | {base_label} | {name} | - | unpaired seeds | - | - | - |")
                    continue
                c = paired_comparison(values[method], values[base])
                verdict = ("no detectable difference" if c["low"] <= 0 <= c["high"] else
                           f"better than {base_label}" if c["low"] > 0 else f"worse than {base_label}")
                out.append(f"| {label} | {base_label} | {name} | {c['n']} | {c['mean']:+.3f} [{c['low']:+.3f}, "
                           f"{c['high']:+.3f}] | {c['better']} / {c['worse']} / {c['tied']} | {c['mde']:.3f} | "
                           f"{verdict} |")
    return out


def _drift_section(runs: Runs, env: str, methods: Sequence[str]) -> List[str]:
    """The drift meter: predicted D (eq. 6) against the measured change of the same responses' entropy."""
    rows = []
    for method in methods:
        predicted, measured, steps, seeds = drift_points(runs[(env, method)])
        if len(predicted) < 3:
            continue
        v = drift_validation(predicted, measured, steps, seeds)
        rows.append(f"| {METHOD_STYLE[method][0]} | {v['points']} | {v['pearson']:+.3f} | {v['spearman']:+.3f} | "
                    f"{v['slope']:+.3f} | {v['intercept']:+.5f} | {_p(v['p'])} | {v['detrended_pearson']:+.3f} | "
                    f"{v['detrended_spearman']:+.3f} | {v['detrended_slope']:+.3f} | {_p(v['detrended_p'])} |")
    if not rows:
        return []
    return [f"Drift meter: predicted drift D (`aem/drift`, eq. 6) against the measured change of the same "
            f"responses' mean entropy across the update (`drift/measured`), every step of every seed; "
            f"calibration = least-squares line measured = intercept + slope * D; p = within-seed permutation "
            f"test of Pearson's r ({PERMUTATIONS} permutations, two-sided); detrended = within-seed residuals "
            f"after a linear trend in the step:\n",
            "| method | points | Pearson | Spearman | slope | intercept | p | detrended Pearson | detrended Spearman "
            "| detrended slope | detrended p |",
            "|---|---|---|---|---|---|---|---|---|---|---|", *rows, ""]


def _p(p: float) -> str:
    return "-" if not np.isfinite(p) else (f"{p:.4f}" if p >= 1e-3 else f"< 0.001 ({p:.1e})")


def _last_mean(seeds: Sequence[List[dict]], key: str, count: int) -> np.ndarray:
    _, values = series(seeds, key, "train")
    return values[:, -count:].mean(1) if values.size else np.array([])


def write_summary(run_dir: str, path: str, header: str = "") -> str:
    text = (header.rstrip() + "\n\n" if header else "") + summary_tables(load_runs(run_dir))
    with open(path, "w") as f:
        f.write(text)
    return text
