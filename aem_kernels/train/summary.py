"""Markdown tables of trainer runs: success rate at fixed steps and the entropy trajectory, mean +- std over
seeds, per environment and method (the table committed as bench/results/trainer/summary.md)."""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

from .plots import METHOD_STYLE, Runs, load_runs, series

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
        if "grpo" in finals and "aem" in finals and len(finals["grpo"]) == len(finals["aem"]):
            out.append("\nPaired differences AEM - GRPO (same seed: same warm start, same first batch):\n")
            for name, values in (("final held-out success", finals), ("mean held-out success after step 0",
                                                                      averages)):
                diff = values["aem"] - values["grpo"]
                out.append(f"- {name}: {_fmt(diff, 3)}; AEM better on {int((diff > 0).sum())}, worse on "
                           f"{int((diff < 0).sum())}, tied on {int((diff == 0).sum())} of {len(diff)} seeds")
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
    return "\n".join(out)


def _last_mean(seeds: Sequence[List[dict]], key: str, count: int) -> np.ndarray:
    _, values = series(seeds, key, "train")
    return values[:, -count:].mean(1) if values.size else np.array([])


def write_summary(run_dir: str, path: str, header: str = "") -> str:
    text = (header.rstrip() + "\n\n" if header else "") + summary_tables(load_runs(run_dir))
    with open(path, "w") as f:
        f.write(text)
    return text
