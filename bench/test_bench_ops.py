"""pytest-benchmark tests for quick before/after comparisons of one change (not part of the CI suite).

    pytest bench/test_bench_ops.py --benchmark-autosave                 # before the change
    pytest bench/test_bench_ops.py --benchmark-compare                  # after: a table against the last save
    pytest bench/test_bench_ops.py --benchmark-compare --benchmark-compare-fail=median:10%   # as a gate
    AEM_BENCH_N=4096 AEM_BENCH_V=151936 AEM_BENCH_DTYPE=bfloat16 pytest bench/test_bench_ops.py -k fwd_bwd

Every timed case of the runner, every line that can run here (same definitions as `python -m bench`); each line's
outputs are checked against the reference line before it is timed. Shape, dtype and rounds come from the
environment (defaults: N=512, V=32000, float32, 5 rounds). torch.compile is left out unless
AEM_BENCH_COMPILE=1 (its compile time would dominate a quick comparison).
"""

import os

import pytest
import torch

from bench import checks
from bench.cases import CASES, Point, all_implementations
from bench.cases.base import make_logits
from bench.implementations import reference_implementation

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
POINT = Point(n=int(os.environ.get("AEM_BENCH_N", 512)), v=int(os.environ.get("AEM_BENCH_V", 32000)),
              dtype=os.environ.get("AEM_BENCH_DTYPE", "float32"), seq_len=int(os.environ.get("AEM_BENCH_T", 128)))
ROUNDS = int(os.environ.get("AEM_BENCH_ROUNDS", 5))
ALL_LINES = all_implementations(DEVICE)
REFERENCE = reference_implementation(ALL_LINES)
LINES = [line for line in ALL_LINES if not (line.compiled and os.environ.get("AEM_BENCH_COMPILE", "0") != "1")]


@pytest.fixture(scope="module")
def base_inputs():
    return make_logits(POINT, DEVICE, seed=0)


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("line", LINES, ids=[line.name for line in LINES])
@pytest.mark.parametrize("case_name", [name for name, case in CASES.items() if case.timed])
def test_bench(benchmark, base_inputs, case_name, line):
    case = CASES[case_name]
    reason = line.unavailable or case.skip_reason(line)
    if reason:
        pytest.skip(reason)
    inputs = case.extend(base_inputs if case.shared_logits else None, POINT, DEVICE, seed=0)
    reference = case.reference_for(REFERENCE)
    expected = case.call(reference, case.prepare(reference, inputs, fresh=False))
    passed, report = checks.compare(case.call(line, case.prepare(line, inputs, fresh=line.mutates_inputs)), expected,
                                    case.tolerance_scale(POINT))
    assert passed, f"{line.name} disagrees with {reference.name}: {report}"

    def timed(state):
        out = case.call(line, state)
        _sync()
        return out

    benchmark.group = f"{case_name} {POINT.key()} {DEVICE.type}"
    benchmark.extra_info.update(n=POINT.n, v=POINT.v, dtype=POINT.dtype, line=line.name)
    benchmark.pedantic(timed, setup=lambda: ((case.prepare(line, inputs, fresh=line.mutates_inputs),), {}),
                       rounds=ROUNDS, warmup_rounds=1)
