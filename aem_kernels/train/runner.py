"""Run many trainer configurations: warm starts first (once per environment), then the runs, in parallel
worker processes when asked (each with its own torch thread count), each writing one JSONL file."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from typing import List, Optional, Sequence, Tuple

from .config import TrainConfig
from .envs import make_env
from .loop import train, warm_started_policy
from .progress import progress as progress_bar
from .tokenizer import WordTokenizer

__all__ = ["run_name", "run_many"]


def run_name(cfg: TrainConfig) -> str:
    return f"{cfg.env}-{cfg.method}-seed{cfg.seed}"


def _run_one(job: Tuple[TrainConfig, str, Optional[str], bool]) -> Tuple[str, float]:
    cfg, path, cache_dir, progress = job
    started = time.perf_counter()
    train(cfg, out_path=path, cache_dir=cache_dir, progress=progress)
    return os.path.basename(path), time.perf_counter() - started


def _record_configs(path: str, configs: Sequence[TrainConfig]) -> None:
    """configs.json lists every run of the folder: runs added later (more seeds) join the earlier ones, and a
    run done again replaces its old entry."""
    entries = {}
    if os.path.exists(path):
        with open(path) as f:
            for entry in json.load(f):
                entries[(entry["env"], entry["method"], entry["seed"])] = entry
    for cfg in configs:
        entries[(cfg.env, cfg.method, cfg.seed)] = cfg.to_dict()
    with open(path, "w") as f:
        json.dump([entries[key] for key in sorted(entries)], f, indent=1)


def run_many(configs: Sequence[TrainConfig], out_dir: str, *, cache_dir: Optional[str], workers: int = 1,
             progress: bool = True) -> List[str]:
    """Run every configuration, writing `out_dir/runs/<env>-<method>-seed<seed>.jsonl`; returns the paths."""
    runs_dir = os.path.join(out_dir, "runs")
    os.makedirs(runs_dir, exist_ok=True)
    _record_configs(os.path.join(out_dir, "configs.json"), configs)
    # one warm start per distinct key, here, so that parallel workers never train the same one twice
    done = set()
    for cfg in configs:
        if cfg.warmstart_key() not in done:
            env = make_env(cfg.env, cfg.reward_scheme)
            warm_started_policy(cfg, env, WordTokenizer(env.vocabulary()), cache_dir, progress)
            done.add(cfg.warmstart_key())
    jobs = [(cfg, os.path.join(runs_dir, run_name(cfg) + ".jsonl"), cache_dir, progress and workers == 1)
            for cfg in configs]
    bar = progress_bar(len(jobs), f"runs ({workers} workers)", progress and workers > 1, leave=True)
    if workers == 1:
        for job in jobs:
            _run_one(job)
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for name, seconds in pool.imap_unordered(_run_one, jobs):
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"{name} {seconds:.0f}s")
    if bar is not None:
        bar.close()
    return [path for _, path, _, _ in jobs]
