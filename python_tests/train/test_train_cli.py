"""The trainer's command line as a log file sees it: progress without a terminal, and a clear error naming
the `train` extra when a module a command needs is missing, before any run starts."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aem_kernels.train.progress import SummaryProgress, progress
from aem_kernels.train.requirements import INSTALL_HINT, NEEDS

ROOT = Path(__file__).resolve().parents[2]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("total,lines,expected", [(150, 10, 10), (7, 10, 7), (1000, 4, 4), (3, 1, 1)])
def test_summary_progress_prints_a_few_lines(total, lines, expected):
    stream = io.StringIO()
    bar = progress(total, "run", stream=stream, lines=lines)
    assert isinstance(bar, SummaryProgress)
    for step in range(total):
        bar.update(1)
        bar.set_postfix(success=f"{step / total:.2f}")
    bar.close()
    out = stream.getvalue().splitlines()
    assert len(out) == expected, out
    assert out[-1].startswith(f"run: {total}/{total} (100%)") and "success=" in out[-1]
    assert "\r" not in stream.getvalue()


def test_summary_progress_prints_the_end_of_an_interrupted_loop():
    stream = io.StringIO()
    bar = progress(100, "warm start", stream=stream)
    for _ in range(15):
        bar.update(1)
    bar.close()
    first, last = stream.getvalue().splitlines()     # the 10 % line, then the end
    assert first.startswith("warm start: 10/100 (10%)") and last.startswith("warm start: 15/100 (15%)")


def test_a_terminal_gets_a_tqdm_bar_and_disabled_gets_nothing():
    tqdm = pytest.importorskip("tqdm")
    bar = progress(5, "x", stream=_Terminal())
    assert isinstance(bar, tqdm.tqdm)
    bar.close()
    assert progress(5, "x", enabled=False) is None


def _run(code: str, tmp_path: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AEM_TRAIN_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_demo_output_to_a_log_is_a_few_lines(tmp_path):
    """`python -m aem_kernels.train demo` with stdout/stderr piped (as in `make demo > log`): no bar redraws,
    at most 10 progress lines per loop (+1 at its end); one worker, so each run reports its own steps."""
    out = tmp_path / "out"
    code = ("import runpy, sys; sys.argv = ['aem_kernels.train', 'demo', '--preset', 'test', '--out', "
            f"{str(out)!r}, '--steps', '30', '--eval-every', '30', '--workers', '1']; "
            "runpy.run_module('aem_kernels.train', run_name='__main__')")
    result = _run(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "\r" not in result.stderr
    lines = result.stderr.splitlines()
    for method in ("grpo", "aem"):
        steps = [line for line in lines if line.startswith(f"household {method} seed 0:")]
        assert len(steps) == 10, lines                  # one line per 3 of the 30 steps
        assert steps[-1].startswith(f"household {method} seed 0: 30/30 (100%)") and "success=" in steps[-1]
    warm = [line for line in lines if line.startswith("warm start household:")]
    assert len(warm) == 3, lines                        # the test preset's warm start has 3 steps
    assert len(lines) < 40, lines
    assert (out / "household.png").exists()


@pytest.mark.parametrize("command", ["compare", "run", "demo", "plot"])
def test_missing_matplotlib_stops_every_plotting_command_before_any_run(tmp_path, command):
    out = tmp_path / "out"
    args = [str(out)] if command == "plot" else ["--preset", "test", "--out", str(out), "--cache-dir", "none"]
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from aem_kernels.train.cli import main\n"
            f"main({[command, *args]!r})")
    result = _run(code, tmp_path, timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    assert f"python -m aem_kernels.train {command} needs matplotlib (the plots)" in message
    assert INSTALL_HINT in message
    assert not out.exists()            # nothing ran: no runs, no warm start, no output folder
    assert "plot" in NEEDS and all("matplotlib" in needs for needs in NEEDS.values())


def test_missing_transformers_is_named_before_any_run(tmp_path):
    """The package and its command line import without transformers; the command names it and the extra."""
    out = tmp_path / "out"
    code = ("import runpy, sys; sys.modules['transformers'] = None; sys.modules['tokenizers'] = None\n"
            f"sys.argv = ['aem_kernels.train', 'run', '--preset', 'test', '--out', {str(out)!r}]\n"
            "runpy.run_module('aem_kernels.train', run_name='__main__')")
    result = _run(code, tmp_path, timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    assert "transformers (the policy model)" in message and "tokenizers (the tokenizer)" in message
    assert "are not installed" in message and INSTALL_HINT in message
    assert not out.exists()
