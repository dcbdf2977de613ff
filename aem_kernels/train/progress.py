"""Progress of the trainer's loops: a tqdm bar on a terminal, a few summary lines anywhere else.

A log file, a CI job or `make demo > log` is not a terminal; there a redrawn bar turns into thousands of
lines. `progress(...)` returns a tqdm bar only when the stream is a TTY (and tqdm is installed), otherwise a
`SummaryProgress` with the same small interface (update, set_postfix, set_postfix_str, close) that prints
at most `lines` + 1 lines: one each time another 1/`lines` of the total is done, and one at the end.
"""

from __future__ import annotations

import math
import sys
import time
from typing import IO, Optional

__all__ = ["progress", "SummaryProgress"]


class SummaryProgress:
    """A few plain progress lines: "<desc>: 30/150 (20%) 12s, success=0.41 H=0.302"."""

    def __init__(self, total: int, desc: str, stream: IO[str], lines: int = 10) -> None:
        self.total, self.desc, self.stream = max(int(total), 0), desc, stream
        self.lines = max(int(lines), 1)
        self.count = 0
        self.postfix = ""
        self.started = time.perf_counter()
        self._k = 1                          # the next milestone is _milestone(_k)
        self._printed_at: Optional[int] = None

    def _milestone(self, k: int) -> int:
        return max(1, math.ceil(self.total * k / self.lines))

    def _print(self) -> None:
        pct = f" ({100 * self.count / self.total:.0f}%)" if self.total else ""
        extra = f", {self.postfix}" if self.postfix else ""
        self.stream.write(f"{self.desc}: {self.count}/{self.total}{pct} {time.perf_counter() - self.started:.0f}s"
                          f"{extra}\n")
        self.stream.flush()
        self._printed_at = self.count

    def update(self, n: int = 1) -> None:
        self.count += n
        if self._k <= self.lines and self.count >= self._milestone(self._k):
            self._print()
            while self._k <= self.lines and self._milestone(self._k) <= self.count:
                self._k += 1

    def set_postfix(self, **values) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def close(self) -> None:
        if self._printed_at != self.count:
            self._print()


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):   # no isatty, or a closed stream
        return False


def progress(total: int, desc: str, enabled: bool = True, *, stream: Optional[IO[str]] = None, leave: bool = False,
             lines: int = 10):
    """A progress reporter for `total` steps on `stream` (stderr by default), or None when not `enabled`."""
    if not enabled:
        return None
    stream = sys.stderr if stream is None else stream
    if _is_terminal(stream):
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            return tqdm(total=total, desc=desc, leave=leave, dynamic_ncols=True, file=stream)
    return SummaryProgress(total, desc, stream, lines)
