"""Plots of trainer runs (matplotlib, Agg backend): per environment, mean +- std over seeds per method.

Panels: held-out success, rollout success, invalid actions per episode, the fraction of groups whose
rewards all tie (GRPO gets no signal from them), token entropy, response entropy (eq. 3'), AEM's predicted
entropy drift D (eq. 6 with the modulated advantages; dashed: the same with the raw GRPO advantages), and
the spread of the modulation weights (std of w; dotted: min and max). Training curves are smoothed with a
centred moving average of `smooth` steps before the seed statistics.
"""

from __future__ import annotations

import glob
import json
import os
from collections import defaultdict
from typing import Dict, List, Sequence, Tuple

import numpy as np

from .algorithm import METHODS

__all__ = ["load_runs", "series", "drift_points", "plot_env", "plot_drift", "plot_all"]

METHOD_STYLE = {"grpo": ("GRPO", "tab:blue"), "aem": ("GRPO+AEM", "tab:red"),
                "entropy": ("GRPO+entropy bonus", "tab:green"), "clip_higher": ("GRPO+clip-higher", "tab:purple"),
                "entropy_tokens": ("GRPO, top-20 % entropy tokens", "tab:olive"),
                "gspo": ("GSPO", "tab:orange"), "gspo_aem": ("GSPO+AEM", "tab:brown"),
                "clip_cov": ("Clip-Cov", "tab:cyan"), "clip_cov_aem": ("Clip-Cov+AEM", "tab:pink"),
                "kl_cov": ("KL-Cov", "tab:gray"), "kl_cov_aem": ("KL-Cov+AEM", "black")}
# the other policy-loss modes' methods: labelled by their name, colours from matplotlib's cycle
_NAMED = {"trl_grpo": "TRL grpo", "dr_grpo": "Dr. GRPO", "dapo": "DAPO", "bnpo": "BNPO"}
for _method in METHODS:
    if _method not in METHOD_STYLE:
        _base = _method[:-4] if _method.endswith("_aem") else _method
        _label = _NAMED.get(_base, _base.replace("_", "-"))
        METHOD_STYLE[_method] = (_label + ("+AEM" if _method.endswith("_aem") else ""), None)

Runs = Dict[Tuple[str, str], List[List[dict]]]   # (env, method) -> one record list per seed


def load_runs(run_dir: str) -> Runs:
    """Every `*.jsonl` in `run_dir`, grouped by (env, method), seeds sorted."""
    runs: Dict[Tuple[str, str], List[Tuple[int, List[dict]]]] = defaultdict(list)
    for path in sorted(glob.glob(os.path.join(run_dir, "*.jsonl"))):
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        if not records or records[0].get("kind") != "config":
            continue
        head = records[0]
        runs[(head["env"], head["method"])].append((head["seed"], records))
    return {key: [r for _, r in sorted(value, key=lambda x: x[0])] for key, value in runs.items()}


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < 2:
        return values
    kernel = np.ones(window)
    padded = np.pad(values, (window // 2, window - 1 - window // 2), mode="edge")
    return np.convolve(padded, kernel, mode="valid") / window


def series(seed_records: Sequence[List[dict]], key: str, kind: str = "train", smooth: int = 1
           ) -> Tuple[np.ndarray, np.ndarray]:
    """(steps [S], values [seeds, S]) of a metric over the steps every seed logged."""
    per_seed = []
    for records in seed_records:
        points = {r["step"]: r[key] for r in records if r.get("kind") == kind and key in r}
        per_seed.append(points)
    common = sorted(set.intersection(*(set(p) for p in per_seed))) if per_seed else []
    values = np.array([[p[s] for s in common] for p in per_seed], dtype=float).reshape(len(per_seed), -1)
    if kind == "train":
        values = np.stack([_smooth(v, smooth) for v in values]) if len(values) else values
    return np.array(common), values


def _band(ax, steps, values, label, color, style="-"):
    if values.size == 0:
        return
    mean, std = values.mean(0), values.std(0)
    ax.plot(steps, mean, style, color=color, label=label, lw=1.6)
    if style == "-":
        ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.18, lw=0)


PANELS = (
    ("eval/success", "eval", "held-out success rate"),
    ("rollout/success", "train", "rollout success rate"),
    ("rollout/invalid_per_episode", "train", "invalid actions per episode"),
    ("rollout/zero_adv_groups", "train", "groups with equal rewards (no signal)"),
    ("policy/token_entropy", "train", "token entropy (nats)"),
    ("policy/response_entropy", "train", "response entropy (mean token entropy)"),
    ("aem/drift", "train", "predicted entropy drift D"),
    ("aem/w_std", "train", "modulation weights: std (dotted: min, max)"),
)


def plot_env(runs: Runs, env: str, path: str, smooth: int = 5) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    for ax, (key, kind, title) in zip(axes.flat, PANELS):
        for method, (label, color) in METHOD_STYLE.items():
            seeds = runs.get((env, method))
            if not seeds:
                continue
            steps, values = series(seeds, key, kind, smooth)
            _band(ax, steps, values, f"{label} (n={len(seeds)})", color)
            if key == "aem/drift":
                _band(ax, *series(seeds, "aem/drift_unmodulated", kind, smooth), None, color, "--")
            if key == "aem/w_std":
                for extra in ("aem/w_min", "aem/w_max"):
                    _band(ax, *series(seeds, extra, kind, smooth), None, color, ":")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        if key == "aem/drift":
            ax.axhline(0.0, color="k", lw=0.6)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.suptitle(f"{env}: methods compared, mean ± std over seeds (training curves smoothed over {smooth} steps)",
                 y=0.99, fontsize=12)
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.955), ncol=max(len(labels), 1),
               frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def drift_points(seed_records: Sequence[List[dict]]) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(predicted D, measured entropy change, step, seed index) of every training step that logged both."""
    rows = [(r["aem/drift"], r["drift/measured"], r["step"], s) for s, records in enumerate(seed_records)
            for r in records if r.get("kind") == "train" and "aem/drift" in r and "drift/measured" in r]
    if not rows:
        return (np.array([]),) * 4
    predicted, measured, steps, seeds = (np.array(c) for c in zip(*rows))
    return predicted.astype(float), measured.astype(float), steps.astype(int), seeds.astype(int)


def plot_drift(runs: Runs, env: str, path: str) -> bool:
    """Scatter of predicted D against the measured entropy change, one panel per method (False: no data)."""
    methods = [m for m in METHOD_STYLE if runs.get((env, m)) and drift_points(runs[(env, m)])[0].size]
    if not methods:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(methods), figsize=(4.5 * len(methods), 4.2), squeeze=False)
    for ax, method in zip(axes[0], methods):
        label, color = METHOD_STYLE[method]
        predicted, measured, _, _ = drift_points(runs[(env, method)])
        ax.scatter(predicted, measured, s=5, alpha=0.35, color=color, lw=0)
        if predicted.size > 1 and predicted.std() > 0:
            slope, intercept = np.polyfit(predicted, measured, 1)
            grid = np.linspace(predicted.min(), predicted.max(), 2)
            ax.plot(grid, intercept + slope * grid, "k-", lw=1, label=f"fit: slope {slope:+.3f}")
            ax.legend(fontsize=8, loc="upper left")
        ax.axhline(0, color="k", lw=0.5)
        ax.axvline(0, color="k", lw=0.5)
        ax.set_title(f"{label} ({len(runs[(env, method)])} seeds)", fontsize=10)
        ax.set_xlabel("predicted drift D (eq. 6)")
        ax.set_ylabel("measured entropy change")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{env}: predicted D vs measured change of the same responses' entropy, every step", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_all(run_dir: str, out_dir: str, smooth: int = 5) -> List[str]:
    """One figure per environment found under `run_dir` (and `<env>-drift.png`, the drift meter's scatter,
    where the runs measured the entropy change); returns the written paths."""
    runs = load_runs(run_dir)
    paths = []
    for env in sorted({env for env, _ in runs}):
        path = os.path.join(out_dir, f"{env}.png")
        plot_env(runs, env, path, smooth)
        paths.append(path)
        drift = os.path.join(out_dir, f"{env}-drift.png")
        if plot_drift(runs, env, drift):
            paths.append(drift)
    return paths
