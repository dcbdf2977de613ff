"""An ALFWorld-like household task: find an object, optionally clean/heat/cool it, put it somewhere.

The room has five storage places (counter, cabinet, drawer, shelf, table) and three appliances (sink: clean,
microwave: heat, fridge: cool). Three objects lie in three different storage places (never the goal place);
the agent only sees what lies where it stands, so it has to explore. A task reads "task : put a hot mug in
cabinet ." and is solved by `go <place>` until the mug is seen, `take mug`, `go microwave`, `heat mug`,
`go cabinet`, `put mug` (3 to 9 actions). Actions:

    go <place>       always valid (also to the current place); the reply says what is there
                     ("at drawer : mug ." or "at drawer : nothing .")
    take <object>    hands empty and the object is here
    put <object>     holding it, at a storage place that holds nothing
    clean|heat|cool <object>   holding it, at the sink | microwave | fridge; a new treatment replaces the last

Anything else is invalid (-0.1, "nothing happens ."). Success (+10) is putting the goal object, with exactly
the required treatment, at the goal place; the episode fails after `max_turns` = 12 actions.

Every observation ends with the same fixed-length status: "holding mug hot . goal : hot mug cabinet ."
("holding nothing - ." with empty hands; "plain" for an untreated object, "some" for a goal without
treatment). With one object per place, every fact a decision needs sits at a fixed distance before it;
what stays long-range is the memory of the places already explored.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple

from .base import TextEnv

__all__ = ["HouseholdEnv", "HouseholdTask", "HouseholdState"]

STORAGE = ("counter", "cabinet", "drawer", "shelf", "table")
APPLIANCE_OF = {"clean": "sink", "heat": "microwave", "cool": "fridge"}
PLACES = STORAGE + tuple(APPLIANCE_OF.values())
OBJECTS = ("mug", "apple", "bowl", "plate", "potato", "cup", "egg", "bread")
# the word of each treatment in the goal ("" = none) and in the status
ADJECTIVE = {"": "some", "clean": "clean", "heat": "hot", "cool": "cold"}
STATE_WORD = {None: "plain", "clean": "clean", "heat": "hot", "cool": "cold"}
VERBS = ("go", "take", "put") + tuple(APPLIANCE_OF)
NUM_OBJECTS = 3


@dataclass(frozen=True)
class HouseholdTask:
    goal_object: str
    goal_place: str
    treatment: str                           # "", "clean", "heat" or "cool"
    placement: Tuple[Tuple[str, str], ...]   # (object, storage place), the goal object first


@dataclass
class HouseholdState:
    task: HouseholdTask
    place: str = "middle"
    holding: Optional[str] = None
    where: Dict[str, str] = field(default_factory=dict)              # object -> place (absent while held)
    treatment: Dict[str, Optional[str]] = field(default_factory=dict)  # object -> last treatment
    known: Set[str] = field(default_factory=set)                     # objects whose place the agent has seen
    visited: Set[str] = field(default_factory=set)
    turn: int = 0
    done: bool = False
    success: bool = False


class HouseholdEnv(TextEnv):
    """See the module docstring."""

    name = "household"
    max_turns = 12

    def vocabulary(self) -> List[str]:
        words = ["task", "goal", ":", "a", "in", ".", "at", "middle", "holding", "took", "nothing", "happens", "-",
                 "is", "plain"]
        words += list(VERBS) + list(PLACES) + list(OBJECTS) + list(ADJECTIVE.values())
        return list(dict.fromkeys(words))

    def sample_task(self, rng: random.Random) -> HouseholdTask:
        objects = rng.sample(OBJECTS, NUM_OBJECTS)
        goal_place = rng.choice(STORAGE)
        places = rng.sample([p for p in STORAGE if p != goal_place], NUM_OBJECTS)
        treatment = rng.choice(tuple(ADJECTIVE))
        return HouseholdTask(objects[0], goal_place, treatment, tuple(zip(objects, places)))

    def reset(self, task: HouseholdTask) -> HouseholdState:
        return HouseholdState(task=task, where=dict(task.placement),
                              treatment={obj: None for obj, _ in task.placement})

    def first_observation(self, state: HouseholdState) -> str:
        t = state.task
        return f"task : put a {ADJECTIVE[t.treatment]} {t.goal_object} in {t.goal_place} . at middle . " \
               + self.goal_reminder(state)

    def goal_reminder(self, state: HouseholdState) -> str:
        t = state.task
        held = f"{state.holding} {STATE_WORD[state.treatment[state.holding]]}" if state.holding else "nothing -"
        return f"holding {held} . goal : {ADJECTIVE[t.treatment]} {t.goal_object} {t.goal_place} ."

    def _transition(self, state: HouseholdState, words: Sequence[str]) -> tuple:
        if len(words) != 2 or words[0] not in VERBS:
            return "", False, False, False
        verb, arg = words
        here = next((obj for obj, place in state.where.items() if place == state.place), None)
        if verb == "go":
            if arg not in PLACES:
                return "", False, False, False
            state.place = arg
            state.visited.add(arg)
            there = next((obj for obj, place in state.where.items() if place == arg), None)
            if there is not None:
                state.known.add(there)
            return f"at {arg} : {there or 'nothing'} .", True, False, False
        if arg not in state.treatment:  # not an object of this task
            return "", False, False, False
        if verb == "take":
            if state.holding is not None or here != arg:
                return "", False, False, False
            del state.where[arg]
            state.holding = arg
            return f"took {arg} .", True, False, False
        if verb == "put":
            if state.holding != arg or state.place not in STORAGE or here is not None:
                return "", False, False, False
            state.holding = None
            state.where[arg] = state.place
            state.known.add(arg)
            task = state.task
            success = (arg == task.goal_object and state.place == task.goal_place
                       and state.treatment[arg] == (task.treatment or None))
            return f"{arg} in {state.place} .", True, success, success
        # clean / heat / cool
        if state.holding != arg or state.place != APPLIANCE_OF[verb]:
            return "", False, False, False
        state.treatment[arg] = verb
        return f"{arg} is {ADJECTIVE[verb]} .", True, False, False

    def expert_action(self, state: HouseholdState, rng: random.Random) -> str:
        task = state.task
        goal = task.goal_object
        if state.holding == goal:
            if task.treatment and state.treatment[goal] != task.treatment:
                appliance = APPLIANCE_OF[task.treatment]
                return f"{task.treatment} {goal}" if state.place == appliance else f"go {appliance}"
            return f"put {goal}" if state.place == task.goal_place else f"go {task.goal_place}"
        occupied = set(state.where.values())
        if state.holding is not None:  # carrying something else: put it back in an empty place
            if state.place in STORAGE and state.place not in occupied and state.place != task.goal_place:
                return f"put {state.holding}"
            return f"go {rng.choice([p for p in STORAGE if p not in occupied and p != task.goal_place])}"
        if goal in state.known:
            place = state.where[goal]
            return f"take {goal}" if state.place == place else f"go {place}"
        unexplored = [p for p in STORAGE if p not in state.visited and p != task.goal_place]
        return f"go {rng.choice(unexplored or list(STORAGE))}"

    def random_action(self, rng: random.Random) -> str:
        verb = rng.choice(VERBS)
        return f"{verb} {rng.choice(PLACES if verb == 'go' else OBJECTS)}"
