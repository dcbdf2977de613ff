"""Command line of the reference trainer: `python -m aem_kernels.train <command> ...`.

    run      one environment and method, one or more seeds (the default command):
             python -m aem_kernels.train --env household --method aem --seeds 5
    compare  methods (default: grpo aem) on environments (default: household shop), every seed, then plots
             and summary.md:
             nice -n 10 python -m aem_kernels.train compare --out bench/results/trainer --workers 2
             python -m aem_kernels.train compare --envs safe --methods grpo aem entropy clip_higher \
                 --out bench/results/trainer-explore --workers 2
             python -m aem_kernels.train compare --envs safe --seeds 5 --methods grpo aem gspo gspo_aem \
                 clip_cov entropy_tokens --out bench/results/trainer-modes --workers 2
    demo     the short demo (GRPO and GRPO+AEM, one environment, one seed; a few minutes on 2 CPU cores)
    plot     plots and summary.md again from the JSONL files of an output directory

Every run writes OUT/runs/<env>-<method>-seed<seed>.jsonl; plots go to OUT/<env>.png.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional, Sequence

from .algorithm import METHODS
from .batching import LEVELS
from .config import COMPARE_SEEDS, PRESETS, TrainConfig, preset
from .envs import ENVS, REWARD_SCHEMES
from .loop import default_cache_dir
from .plots import plot_all
from .requirements import require
from .runner import run_many
from .summary import write_summary

COMMANDS = ("run", "compare", "demo", "plot")


def _add_common(p: argparse.ArgumentParser, default_preset: str) -> None:
    p.add_argument("--preset", choices=tuple(PRESETS), default=default_preset,
                   help="budget preset (see aem_kernels/train/config.py)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds")
    p.add_argument("--first-seed", type=int, default=None,
                   help="seeds are first-seed, first-seed+1, ... (default: 0 = the comparison seeds)")
    p.add_argument("--out", default=None, help="output directory")
    p.add_argument("--workers", type=int, default=1, help="runs in parallel processes (1 torch thread each)")
    p.add_argument("--cache-dir", default=None, help="warm-start cache (default $AEM_TRAIN_CACHE or "
                                                     "~/.cache/aem_kernels; 'none' disables it)")
    p.add_argument("--no-progress", action="store_true", help="no progress output (by default: tqdm bars on a "
                                                               "terminal, a few summary lines otherwise)")
    g = p.add_argument_group("overrides of the preset")
    g.add_argument("--steps", type=int)
    g.add_argument("--tasks-per-step", type=int)
    g.add_argument("--group-size", type=int)
    g.add_argument("--level", choices=LEVELS)
    g.add_argument("--beta", type=float, help="AEM strength for method aem")
    g.add_argument("--entropy-coef", type=float, help="entropy-bonus coefficient for method entropy")
    g.add_argument("--clip-high", type=float, help="upper ratio clip for method clip_higher")
    g.add_argument("--top-entropy-quantile", type=float, help="share of top-entropy tokens for entropy_tokens")
    g.add_argument("--spread-floor", type=float, help="AEM's absolute spread floor (eq. 5)")
    g.add_argument("--relative-spread-floor", type=float, help="AEM's spread floor relative to the group mean")
    g.add_argument("--lr", type=float)
    g.add_argument("--ppo-epochs", type=int)
    g.add_argument("--minibatches", type=int)
    g.add_argument("--kl-coef", type=float)
    g.add_argument("--temperature", type=float)
    g.add_argument("--reward-scheme", choices=REWARD_SCHEMES)
    g.add_argument("--warmstart-steps", type=int)
    g.add_argument("--eval-every", type=int)
    g.add_argument("--threads", type=int)


_OVERRIDES = ("steps", "tasks_per_step", "group_size", "level", "beta", "entropy_coef", "clip_high",
              "top_entropy_quantile", "spread_floor", "relative_spread_floor", "lr", "ppo_epochs", "minibatches",
              "kl_coef", "temperature", "reward_scheme", "warmstart_steps", "eval_every", "threads")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m aem_kernels.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")
    run = sub.add_parser("run", help="one environment and method, several seeds")
    run.add_argument("--env", choices=tuple(ENVS), default="household")
    run.add_argument("--method", choices=METHODS, default="aem")
    _add_common(run, "compare")
    compare = sub.add_parser("compare", help="several methods on several environments")
    # defaults: the committed comparison of bench/results/trainer (the safe one names its envs and methods)
    compare.add_argument("--envs", nargs="+", choices=tuple(ENVS), default=["household", "shop"])
    compare.add_argument("--methods", nargs="+", choices=METHODS, default=["grpo", "aem"])
    _add_common(compare, "compare")
    demo = sub.add_parser("demo", help="the short demo")
    demo.add_argument("--env", choices=tuple(ENVS), default="household")
    _add_common(demo, "demo")
    demo.set_defaults(workers=2)
    plot = sub.add_parser("plot", help="plots and summary from an output directory")
    plot.add_argument("out", help="output directory of a run / compare / demo")
    return p


def _configs(args, envs: Sequence[str], methods: Sequence[str], default_seeds: int) -> List[TrainConfig]:
    overrides = {k: getattr(args, k) for k in _OVERRIDES}
    count = args.seeds if args.seeds is not None else default_seeds
    first = args.first_seed if args.first_seed is not None else COMPARE_SEEDS[0]
    return [preset(args.preset, env=env, method=method, seed=first + s, **overrides)
            for env in envs for method in methods for s in range(count)]


def _report(out: str) -> None:
    """Plots and summary.md from OUT/runs; summary.md starts with OUT/command.md (what was run, written by the
    run) and OUT/notes.md (hand-written remarks), when they exist."""
    parts = []
    for name in ("command.md", "notes.md"):
        path = os.path.join(out, name)
        if os.path.exists(path):
            with open(path) as f:
                parts.append(f.read().strip())
    runs = os.path.join(out, "runs")
    paths = plot_all(runs, out)
    text = write_summary(runs, os.path.join(out, "summary.md"), "\n\n".join(parts))
    print(text)
    print("plots:", ", ".join(paths))


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS + ("-h", "--help"):
        argv = ["run"] + argv  # `python -m aem_kernels.train --env household --method aem --seeds 5`
    args = parser().parse_args(argv)
    require(args.command)   # every module the command needs (the plots' matplotlib too), before any run
    if args.command == "plot":
        _report(args.out)
        return 0
    if args.command == "run":
        configs = _configs(args, [args.env], [args.method], 1)
    elif args.command == "compare":
        configs = _configs(args, args.envs, args.methods, len(COMPARE_SEEDS))
    else:
        configs = _configs(args, [args.env], ["grpo", "aem"], 1)
    out = args.out or os.path.join("runs", args.command)
    cache = None if args.cache_dir == "none" else (args.cache_dir or default_cache_dir())
    started = time.perf_counter()
    run_many(configs, out, cache_dir=cache, workers=args.workers, progress=not args.no_progress)
    minutes = (time.perf_counter() - started) / 60
    with open(os.path.join(out, "command.md"), "w") as f:
        f.write(f"# {args.command}: {len(configs)} runs, preset `{args.preset}`, {minutes:.1f} min wall time "
                f"({max(args.workers, 1)} worker processes)\n\n`python -m aem_kernels.train {' '.join(argv)}`\n")
    _report(out)
    return 0
