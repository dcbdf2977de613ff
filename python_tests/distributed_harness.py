"""The torch.distributed test harness: a test module registers its checks, the harness runs them in W spawned
processes (gloo on CPU), and the module's tests read each rank's outcome.

One spawn per world size serves every module that registered checks in this test session (pytest imports every
test module before the first test runs): the W processes import torch once, not once per module (4 processes
importing torch on a loaded 2-core machine took ~25 s). The children find each check by its module and name.

A check is fn(rank, world) that compares what this rank computed with a single-process reference it computes
itself from the same seeded data. It records its mismatches (`Mismatches`) and raises only after its last
collective, so one failing rank never leaves the others waiting in an all_reduce. Each check declares the
world sizes it runs at, so that no test reads the outcome of a check that compared nothing at its size.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from datetime import timedelta
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

Check = Callable[[int, int], None]
_REGISTRIES: List["Checks"] = []   # every module's checks, in import order


class Checks:
    """The checks of one test module: `@CHECKS.register(worlds=(2, 4))` above a fn(rank, world)."""

    def __init__(self, module: str):
        self.module = module
        self._checks: Dict[str, Tuple[Check, Tuple[int, ...]]] = {}
        _REGISTRIES.append(self)

    def register(self, *, worlds: Sequence[int]) -> Callable[[Check], Check]:
        def add(fn: Check) -> Check:
            assert fn.__name__ not in self._checks, f"two checks named {fn.__name__} in {self.module}"
            self._checks[fn.__name__] = (fn, tuple(worlds))
            return fn  # the function itself: the spawned processes unpickle it by its module and name
        return add

    def at(self, world: int) -> List[Check]:
        """The checks that run at `world` processes, in registration order."""
        return [fn for fn, worlds in self._checks.values() if world in worlds]

    def names(self, world: int) -> List[str]:
        return [fn.__name__ for fn in self.at(world)]

    def cases(self, worlds: Sequence[int]) -> list:
        """pytest parameters (world, name) of every check at every world size it runs at, world-major (so the
        spawns of one world size serve consecutive tests)."""
        return [pytest.param(w, name, id=f"world{w}-{name}") for w in worlds for name in self.names(w)]

    def __getitem__(self, name: str) -> Check:
        return self._checks[name][0]


class Mismatches:
    """Collects failed comparisons of one check; `raise_if_any` at its end (after its last collective)."""

    def __init__(self):
        self.items: List[str] = []

    def close(self, name: str, got, want, atol: float, rtol: float = 0.0) -> None:
        """|got - want| <= atol + rtol * max|want| on the finite entries; NaN and inf patterns equal."""
        got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
        if got.shape != want.shape:
            self.items.append(f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
            return
        same_nan = torch.equal(torch.isnan(got), torch.isnan(want))
        ok = ~torch.isnan(want)
        finite = ok & torch.isfinite(want)
        same_inf = torch.equal(got[ok & ~finite], want[ok & ~finite])
        err = (got[finite] - want[finite]).abs().max().item() if bool(finite.any()) else 0.0
        bound = atol + rtol * (want[finite].abs().max().item() if bool(finite.any()) else 0.0)
        if not (same_nan and same_inf and err <= bound):
            self.items.append(f"{name}: err {err:.3g} > {bound:.3g} (nan pattern equal {same_nan}, inf equal "
                              f"{same_inf})")

    def true(self, name: str, condition: bool) -> None:
        if not condition:
            self.items.append(name)

    def raises(self, name: str, exc_type: type, pattern: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except exc_type as exc:
            if pattern.lower() not in str(exc).lower():
                self.items.append(f"{name}: {exc_type.__name__} without {pattern!r}: {exc}")
        except Exception as exc:  # noqa: BLE001 - any other exception is the failure being reported
            self.items.append(f"{name}: expected {exc_type.__name__}, got {type(exc).__name__}: {exc}")
        else:
            self.items.append(f"{name}: no {exc_type.__name__} raised")

    def raise_if_any(self) -> None:
        if self.items:
            raise AssertionError("\n".join(self.items))


def slice_bounds(world: int, vocab: int, generator: torch.Generator, even: bool) -> List[int]:
    """The vocabulary cuts [0, c_1, ..., V] of `world` contiguous slices: equal widths or random non-empty ones
    (needs vocab >= world)."""
    if even:
        return [vocab * r // world for r in range(world + 1)]
    cuts = torch.randperm(vocab - 1, generator=generator)[:world - 1] + 1
    return [0] + sorted(cuts.tolist()) + [vocab]


# ---- the spawn ------------------------------------------------------------------------------------------------

def _run_gloo_checks(rank: int, world: int, store_path: str, checks: Sequence[Check]) -> Dict[str, object]:
    torch.set_num_threads(1)  # W processes share the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=int(os.environ.get("AEM_TEST_DIST_TIMEOUT", "120"))))
    results: Dict[str, object] = {}
    for fn in checks:
        key = _key(fn.__module__, fn.__name__)
        torch.manual_seed(0)
        started = time.perf_counter()
        try:
            fn(rank, world)
            results[key] = None
        except Exception:  # noqa: BLE001 - reported to the parent test
            results[key] = traceback.format_exc()
            if os.environ.get("AEM_TEST_DIST_VERBOSE"):
                print(f"rank {rank}: {results[key]}", flush=True)
        results[f"{key}/seconds"] = time.perf_counter() - started
        dist.barrier()
    dist.destroy_process_group()
    return results


def _entry(rank: int, worker: Callable[..., Dict[str, object]], world: int, store_path: str, out_dir: str,
           args: tuple) -> None:
    results = worker(rank, world, store_path, *args)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    # The results are on disk: leave without the interpreter's teardown, where a C++ thread's destructor
    # (seen once in ~10 spawns, after every check had passed and both ranks had written their results)
    # called std::terminate ("terminate called without an active exception") and failed every check of the
    # spawn with SIGABRT.
    os._exit(0)


def spawn(worker: Callable[..., Dict[str, object]], world: int, tmp_path, *args,
          timeout_s: float = 300) -> List[Dict[str, object]]:
    """Each rank's dict of `worker(rank, world, store_path, *args)` (which initialises and destroys its own
    process group with the file store `store_path`) from `world` spawned processes."""
    ctx = mp.start_processes(_entry, args=(worker, world, str(tmp_path / "store"), str(tmp_path), args),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for process in ctx.processes:
                process.kill()
            pytest.fail(f"the {world} worker processes did not finish within {timeout_s} s")
    results = []
    for r in range(world):
        with open(tmp_path / f"rank{r}.json") as f:
            results.append(json.load(f))
    return results


def _key(module: str, name: str) -> str:
    return f"{module}::{name}"


_RESULTS: Dict[int, List[Dict[str, object]]] = {}


def assert_check_passed(checks: Checks, world: int, name: str, tmp_path_factory) -> None:
    """Check `name` of `checks` passed on every rank of a `world`-process gloo run. The run (of every registered
    check at that world size) happens once per test session, at the first test that needs it."""
    if world not in _RESULTS:
        every = [fn for registry in _REGISTRIES for fn in registry.at(world)]
        _RESULTS[world] = spawn(_run_gloo_checks, world, tmp_path_factory.mktemp(f"world{world}"), every)
    key = _key(checks[name].__module__, name)
    failures: Dict[int, Optional[str]] = {rank: res[key] for rank, res in enumerate(_RESULTS[world])
                                          if res[key] is not None}
    assert not failures, "\n".join(f"rank {rank} of {world}:\n{text}" for rank, text in failures.items())
