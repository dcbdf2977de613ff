"""A WebShop-like shopping task: search a small catalogue, inspect items, buy the one the instruction asks for.

Each task instance is a catalogue of eight items (color, kind, size) and an instruction, e.g.
"task : buy red shirt size large .". Exactly one item matches all three attributes; the catalogue also
holds decoys of the same color and kind in another size (only visible on the item's page) and of the same
kind in another color, so the agent has to search, open items and go back until it finds the right one.
Pages and actions:

    search <word>    from any page; lists the first four items that have the attribute <word>, by id
                     ("results : red shirt i2 , blue shirt i5 seen .": color and kind, not size;
                     "seen" marks items opened before)
    click <item>     on a results page, an item of that list: its page ("i5 : blue shirt , size small .")
    back             on an item page: the results again
    buy              on an item page: ends the episode; success (+10) iff the item matches the instruction

Anything else is invalid (-0.1, "nothing happens ."); the episode fails after `max_turns` = 8 actions
(the scripted expert needs at most 7).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Set, Tuple

from .base import TextEnv

__all__ = ["ShopEnv", "ShopTask", "ShopState"]

COLORS = ("red", "blue", "green", "black", "white")
KINDS = ("shirt", "shoes", "hat", "bag", "jacket")
SIZES = ("small", "medium", "large")
ATTRIBUTES = COLORS + KINDS + SIZES
NUM_ITEMS = 8
ITEM_IDS = tuple(f"i{n}" for n in range(1, NUM_ITEMS + 1))
MAX_RESULTS = 4
VERBS = ("search", "click", "back", "buy")

Item = Tuple[str, str, str]  # (color, kind, size)


@dataclass(frozen=True)
class ShopTask:
    target: Item
    catalogue: Tuple[Item, ...]  # item ITEM_IDS[n] is catalogue[n]


@dataclass
class ShopState:
    task: ShopTask
    page: str = "start"                 # "start", "results" or "item"
    results: Tuple[int, ...] = ()       # catalogue indices listed on the results page
    item: Optional[int] = None          # catalogue index of the open item page
    opened: Set[int] = field(default_factory=set)
    turn: int = 0
    done: bool = False
    success: bool = False


class ShopEnv(TextEnv):
    """See the module docstring."""

    name = "shop"
    max_turns = 8

    def vocabulary(self) -> List[str]:
        words = ["task", "goal", ":", "buy", "you", "bought", "size", ".", ",", "search", "page", "results", "none",
                 "seen", "nothing", "happens"]
        words += list(VERBS) + list(ATTRIBUTES) + list(ITEM_IDS)
        return list(dict.fromkeys(words))

    def sample_task(self, rng: random.Random) -> ShopTask:
        color, kind, size = rng.choice(COLORS), rng.choice(KINDS), rng.choice(SIZES)
        items: List[Item] = [(color, kind, size)]
        n_size_decoys = rng.randint(1, 2)
        n_color_decoys = rng.randint(1, MAX_RESULTS - 1 - n_size_decoys)  # the kind's items fit one results page
        items += [(color, kind, rng.choice([s for s in SIZES if s != size])) for _ in range(n_size_decoys)]
        items += [(rng.choice([c for c in COLORS if c != color]), kind, rng.choice(SIZES))
                  for _ in range(n_color_decoys)]
        while len(items) < NUM_ITEMS:
            items.append((rng.choice(COLORS), rng.choice([k for k in KINDS if k != kind]), rng.choice(SIZES)))
        rng.shuffle(items)
        return ShopTask((color, kind, size), tuple(items))

    def reset(self, task: ShopTask) -> ShopState:
        return ShopState(task=task)

    def first_observation(self, state: ShopState) -> str:
        color, kind, size = state.task.target
        return f"task : buy {color} {kind} size {size} . search page . {self.goal_reminder(state)}"

    def goal_reminder(self, state: ShopState) -> str:
        return "goal : " + " ".join(state.task.target) + " ."

    def _results_text(self, state: ShopState) -> str:
        # "red shirt i5": the id after its attributes, so that the id's own position already knows them;
        # items opened before are marked "seen" (a browser's visited link)
        listed = " , ".join(" ".join(state.task.catalogue[n][:2]) + f" {ITEM_IDS[n]}" +
                            (" seen" if n in state.opened else "") for n in state.results)
        return f"results : {listed or 'none'} ."

    def _transition(self, state: ShopState, words: Sequence[str]) -> tuple:
        if not words or words[0] not in VERBS:
            return "", False, False, False
        verb, args = words[0], words[1:]
        if verb == "search" and len(args) == 1 and args[0] in ATTRIBUTES:
            matches = [n for n, item in enumerate(state.task.catalogue) if args[0] in item]
            state.page, state.results, state.item = "results", tuple(matches[:MAX_RESULTS]), None
            return self._results_text(state), True, False, False
        if verb == "click" and len(args) == 1 and state.page == "results" and args[0] in ITEM_IDS:
            n = ITEM_IDS.index(args[0])
            if n not in state.results:
                return "", False, False, False
            state.page, state.item = "item", n
            state.opened.add(n)
            color, kind, size = state.task.catalogue[n]
            return f"{args[0]} : {color} {kind} , size {size} .", True, False, False
        if verb == "back" and not args and state.page == "item":
            state.page, state.item = "results", None
            return self._results_text(state), True, False, False
        if verb == "buy" and not args and state.page == "item":
            success = state.task.catalogue[state.item] == state.task.target
            return f"you bought {ITEM_IDS[state.item]} .", True, success, True
        return "", False, False, False

    def expert_action(self, state: ShopState, rng: random.Random) -> str:
        color, kind, _ = state.task.target
        if state.page == "item":
            return "buy" if state.task.catalogue[state.item] == state.task.target else "back"
        if state.page == "results":
            for n in state.results:
                if state.task.catalogue[n][:2] == (color, kind) and n not in state.opened:
                    return f"click {ITEM_IDS[n]}"
        return f"search {kind}"

    def random_action(self, rng: random.Random) -> str:
        verb = rng.choice(VERBS)
        if verb == "search":
            return f"search {rng.choice(ATTRIBUTES)}"
        if verb == "click":
            return f"click {rng.choice(ITEM_IDS)}"
        return verb
