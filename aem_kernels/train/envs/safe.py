"""A safe-cracking task where the agent has to probe before it answers, with actions of varying length.

Each task instance is a safe with a code of 2 to 4 digits (each 1-6) and a stale note: the note shows the
right code with probability `NOTE_CORRECT` (0.4), otherwise the code with one digit changed. Every observation
ends with a fixed-length status line: "length 3 note : 3 1 4 - ." until the agent checks a position, then
"length 3 readout : 4 ? ? - ." (the digits checked so far, "?" for unchecked positions, "-" beyond the code's
length): the note is gone from the status once the agent starts checking.
Actions:

    check <position>    p1 ... p4, a position of the code; the reply names its digit ("p2 is 5 .") and the
                        readout shows it from then on (checking a position again is valid but wastes a turn)
    enter <digits>      exactly `length` digits ("enter 3 1 4"); ends the episode: success (+10) iff they are
                        the code ("the safe opens ."), failure (0) otherwise ("wrong code ." )

Anything else is invalid (-0.1, "nothing happens ."), including `enter` with the wrong number of digits and
`check` beyond the code's length; the episode fails after `max_turns` = 5 actions (checking every position of
a 4-digit code and entering it takes all 5: no slack for a mistake). Responses are 3 to 6 tokens with <end> ("check p2 <end>",
"enter 3 1 4 2 <end>"), so token and response entropies differ.

Why exploration matters here. Two strategies copy digits at a fixed distance, which the small policy learns:
*confident*, enter the note's code at once (one turn, succeeds 40 % of the time), and *careful*, check every
position, then enter the readout (succeeds always); both copy the digits of the status line. Strategies in
between are worse than both: once the agent has checked a position, the note is only in the first
observation, farther back in the context, and the readout has "?" where it has not checked, so a partial
check followed by an answer mostly guesses (or copies a "?", an invalid action). The confident strategy is therefore a real local optimum: a
policy that checks a little more often than it did first loses reward, and only one that commits to checking
every position gains. The demonstrator (`expert_action`) is mostly confident (`CAREFUL_START` = 3 % of its
first moves are checks; once it has checked it checks every position), and the demonstrations' noise
(untrained random actions, half of them checks) shows careful play from odd starts, so the warm-started
policy enters the note at once almost always (about 97 % of first moves), executes careful play only
imperfectly when it does check, and RL has to find and improve the careful strategy from the few careful
samples it draws.
`solver_action` is the careful strategy (always succeeds).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

from .base import TextEnv

__all__ = ["SafeEnv", "SafeTask", "SafeState", "NOTE_CORRECT", "CAREFUL_START"]

DIGITS = ("1", "2", "3", "4", "5", "6")
POSITIONS = ("p1", "p2", "p3", "p4")
LENGTHS = (2, 3, 4)
VERBS = ("check", "enter")
NOTE_CORRECT = 0.4
CAREFUL_START = 0.03
RANDOM_CHECK = 0.5   # share of `check` among the random actions (demonstration noise)


@dataclass(frozen=True)
class SafeTask:
    code: Tuple[str, ...]
    note: Tuple[str, ...]   # the code, or the code with one digit changed


@dataclass
class SafeState:
    task: SafeTask
    checked: Dict[int, str] = field(default_factory=dict)   # position index -> digit seen
    turn: int = 0
    done: bool = False
    success: bool = False


def _padded(digits: Sequence[str]) -> str:
    return " ".join(list(digits) + ["-"] * (len(POSITIONS) - len(digits)))


class SafeEnv(TextEnv):
    """See the module docstring."""

    name = "safe"
    max_turns = 5

    def vocabulary(self) -> List[str]:
        words = ["task", ":", "open", "the", "safe", ".", "note", "length", "readout", "?", "-", "is", "opens",
                 "wrong", "code", "nothing", "happens"]
        words += list(VERBS) + list(DIGITS) + list(POSITIONS) + [str(n) for n in LENGTHS]
        return list(dict.fromkeys(words))

    def sample_task(self, rng: random.Random) -> SafeTask:
        code = tuple(rng.choice(DIGITS) for _ in range(rng.choice(LENGTHS)))
        note = list(code)
        if rng.random() >= NOTE_CORRECT:
            k = rng.randrange(len(code))
            note[k] = rng.choice([d for d in DIGITS if d != code[k]])
        return SafeTask(code, tuple(note))

    def reset(self, task: SafeTask) -> SafeState:
        return SafeState(task=task)

    def first_observation(self, state: SafeState) -> str:
        return f"task : open the safe . {self.goal_reminder(state)}"

    def goal_reminder(self, state: SafeState) -> str:
        length = len(state.task.code)
        if not state.checked:
            return f"length {length} note : {_padded(state.task.note)} ."
        readout = [state.checked.get(k, "?") for k in range(length)]
        return f"length {length} readout : {_padded(readout)} ."

    def _transition(self, state: SafeState, words: Sequence[str]) -> tuple:
        code = state.task.code
        if len(words) == 2 and words[0] == "check" and words[1] in POSITIONS:
            k = POSITIONS.index(words[1])
            if k >= len(code):
                return "", False, False, False
            state.checked[k] = code[k]
            return f"{words[1]} is {code[k]} .", True, False, False
        if words and words[0] == "enter" and len(words) == len(code) + 1 and all(d in DIGITS for d in words[1:]):
            success = tuple(words[1:]) == code
            return ("the safe opens ." if success else "wrong code ."), True, success, True
        return "", False, False, False

    def solver_action(self, state: SafeState) -> str:
        """The careful strategy: check the first unchecked position, then enter the readout."""
        code = state.task.code
        unchecked = [k for k in range(len(code)) if k not in state.checked]
        if unchecked:
            return f"check {POSITIONS[unchecked[0]]}"
        return "enter " + " ".join(state.checked[k] for k in range(len(code)))

    def expert_action(self, state: SafeState, rng: random.Random) -> str:
        """The demonstrator: before any check, enter the note (97 %) or start checking (3 %); after a check,
        the careful strategy (it uses only what the agent has seen)."""
        if not state.checked and rng.random() >= CAREFUL_START:
            return "enter " + " ".join(state.task.note)
        return self.solver_action(state)

    def random_action(self, rng: random.Random) -> str:
        """Mostly a `check` of any position (in a demonstration that is an untrained step, after which the
        demonstrator checks carefully: careful play is demonstrated often while the demonstrated first
        decision stays mostly confident); otherwise `enter` with random digits of a random length."""
        if rng.random() < RANDOM_CHECK:
            return f"check {rng.choice(POSITIONS)}"
        return "enter " + " ".join(rng.choice(DIGITS) for _ in range(rng.choice(LENGTHS)))
