"""The statistics of the trainer comparisons (numpy only), fixed before the runs they analyse.

Method comparison (per environment, every method against GRPO, paired by seed: the runs of one seed share
the warm start and the first batch):

    outcome      per seed, the mean held-out success over the evaluations after step 0 (primary), the final
                 held-out success, the rollout success of the last 10 steps (secondary)
    difference   method - GRPO per seed; its mean, a 95 % percentile bootstrap interval over seeds
                 (`BOOTSTRAP` = 10^4 resamples, fixed generator seed 0), and the counts better/worse/tied
    verdict      "no detectable difference" when the interval contains 0; with it the minimal detectable
                 effect of the design: (t_{0.975, n-1} + t_{0.80, n-1}) * sd(difference) / sqrt(n), the mean
                 paired difference a two-sided 5 % test would detect with 80 % power at the observed spread

Drift meter (per environment and method, over every logged step of every seed): the predicted entropy drift
D (`aem/drift`, AEM_SPEC eq. 6) against the measured change of the same responses' entropy across the update
(`drift/measured`). Reported: Pearson r, Spearman rho, the calibration slope and intercept of the least-squares
line measured = a + b * D, and a permutation p-value of r (`PERMUTATIONS` = 10^4, measured values shuffled
among the steps of each seed, two-sided, (hits + 1) / (permutations + 1)). Both series drift over training
(entropy falls, D shrinks), which alone correlates them; so the same statistics are also reported on the
within-seed residuals after removing a linear trend in the step from each series ("detrended"): that is the
test that the meter tracks the step-to-step change, not only the trend.
"""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np

__all__ = ["BOOTSTRAP", "PERMUTATIONS", "bootstrap_ci", "minimal_detectable_effect", "paired_comparison",
           "pearson", "spearman", "drift_validation", "t_quantile"]

BOOTSTRAP = 10_000
PERMUTATIONS = 10_000

# Student t quantiles for df = 1..30 (beyond: the normal ones)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
_T80 = (1.376, 1.061, 0.978, 0.941, 0.920, 0.906, 0.896, 0.889, 0.883, 0.879, 0.876, 0.873, 0.870, 0.868, 0.866,
        0.865, 0.863, 0.862, 0.861, 0.860, 0.859, 0.858, 0.858, 0.857, 0.856, 0.856, 0.855, 0.855, 0.854, 0.854)


def t_quantile(q: float, df: int) -> float:
    """The Student t quantile for q in {0.975, 0.80} (the two the design uses)."""
    table = {0.975: (_T975, 1.960), 0.80: (_T80, 0.842)}
    if q not in table:
        raise ValueError(f"q must be 0.975 or 0.80, got {q}")
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    values, normal = table[q]
    return values[df - 1] if df <= len(values) else normal


def bootstrap_ci(values: Sequence[float], level: float = 0.95, resamples: int = BOOTSTRAP, seed: int = 0):
    """Percentile bootstrap interval (low, high) of the mean of `values` (resampled with replacement)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("values is empty")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def minimal_detectable_effect(differences: Sequence[float]) -> float:
    """(t_0.975 + t_0.80) * sd / sqrt(n): the paired mean difference detectable with 80 % power at 5 %."""
    d = np.asarray(differences, dtype=float)
    if d.size < 2:
        return float("nan")
    df = d.size - 1
    return float((t_quantile(0.975, df) + t_quantile(0.80, df)) * d.std(ddof=1) / np.sqrt(d.size))


def paired_comparison(method: Sequence[float], baseline: Sequence[float]) -> Dict[str, float]:
    """Mean paired difference, its bootstrap 95 % interval, the sign counts and the design's MDE."""
    a, b = np.asarray(method, dtype=float), np.asarray(baseline, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"method and baseline must pair up seed by seed, got {a.shape} and {b.shape}")
    d = a - b
    low, high = bootstrap_ci(d)
    return {"mean": float(d.mean()), "low": low, "high": high, "n": int(d.size), "better": int((d > 0).sum()),
            "worse": int((d < 0).sum()), "tied": int((d == 0).sum()), "mde": minimal_detectable_effect(d),
            "sd": float(d.std(ddof=1)) if d.size > 1 else float("nan")}


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denominator) if denominator > 0 else float("nan")


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their ranks)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(x.size)
    ranks[order] = np.arange(x.size, dtype=float)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(_ranks(x), _ranks(y))


def _detrend(values: np.ndarray, steps: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    out = np.empty_like(values)
    for s in np.unique(seeds):
        sel = seeds == s
        if sel.sum() < 3:
            out[sel] = values[sel] - values[sel].mean()
            continue
        design = np.stack([np.ones(sel.sum()), steps[sel]], 1)
        coef, *_ = np.linalg.lstsq(design, values[sel], rcond=None)
        out[sel] = values[sel] - design @ coef
    return out


def _within_seed_permutation_p(x: np.ndarray, y: np.ndarray, seeds: np.ndarray, permutations: int,
                               seed: int, chunk: int = 500) -> float:
    observed = abs(pearson(x, y))
    if not np.isfinite(observed):
        return float("nan")
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(seeds == s) for s in np.unique(seeds)]
    xc = x - x.mean()
    hits, done = 0, 0
    while done < permutations:
        count = min(chunk, permutations - done)
        index = np.empty((count, y.size), dtype=np.int64)
        for idx in groups:   # each row: an independent shuffle of the steps within every seed
            index[:, idx] = rng.permuted(np.broadcast_to(idx, (count, idx.size)), axis=1)
        shuffled = y[index]
        shuffled = shuffled - shuffled.mean(1, keepdims=True)
        r = (shuffled @ xc) / np.sqrt((xc * xc).sum() * (shuffled * shuffled).sum(1))
        hits += int((np.abs(r) >= observed - 1e-12).sum())
        done += count
    return (hits + 1) / (permutations + 1)


def drift_validation(predicted: Sequence[float], measured: Sequence[float], steps: Sequence[int],
                     seeds: Sequence[int], permutations: int = PERMUTATIONS, seed: int = 0) -> Dict[str, float]:
    """Pearson, Spearman, calibration (slope, intercept) and the permutation p-value of predicted D against
    the measured entropy change, raw and within-seed detrended (keys prefixed "detrended_")."""
    x, y = np.asarray(predicted, dtype=float), np.asarray(measured, dtype=float)
    st, sd = np.asarray(steps, dtype=float), np.asarray(seeds)
    if not (x.shape == y.shape == st.shape == sd.shape) or x.ndim != 1:
        raise ValueError("predicted, measured, steps and seeds must be 1-d of one length")
    out: Dict[str, float] = {"points": int(x.size)}
    for prefix, (a, b) in (("", (x, y)), ("detrended_", (_detrend(x, st, sd), _detrend(y, st, sd)))):
        slope, intercept = (np.polyfit(a, b, 1) if a.size > 1 and a.std() > 0 else (float("nan"),) * 2)
        out.update({f"{prefix}pearson": pearson(a, b), f"{prefix}spearman": spearman(a, b),
                    f"{prefix}slope": float(slope), f"{prefix}intercept": float(intercept),
                    f"{prefix}p": _within_seed_permutation_p(a, b, sd, permutations, seed)})
    return out
