"""Trajectories -> the packed inputs of `ak.aem_policy_loss` (token_response, response_group, advantages).

Each trajectory becomes one right-padded row: <bos>, goal, then (action, observation) per turn. The model
predicts token p+1 from position p, so the loss sees logits[:, :-1] and labels = input_ids[:, 1:]; label
position p is trained iff token p+1 is an action token. Its response is chosen by `level`:

    "turn"        every turn of every trajectory is a response (the paper's multi-turn setting); the turns
                  of all G trajectories of a task instance form its group
    "trajectory"  all action tokens of a trajectory form one response (spread over the turns: the packed
                  map does not need contiguity); the G trajectories of a task instance form its group

Prompt, observation and padding positions get token_response = -1 (not trained). The advantage of a
response is its trajectory's advantage (outcome reward: every turn shares it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch

from .rollout import Trajectory

__all__ = ["PolicyBatch", "build_policy_batch", "LEVELS"]

LEVELS = ("turn", "trajectory")


@dataclass
class PolicyBatch:
    """Tensors for one forward/backward pass; shapes with B rows, T tokens, R responses."""

    input_ids: torch.Tensor            # [B, T] int64, right-padded
    attention_mask: torch.Tensor       # [B, T] int64
    labels: torch.Tensor               # [B, T-1] int64 = input_ids[:, 1:]
    token_response: torch.Tensor       # [B, T-1] int64, response of each label, -1 if not trained
    response_group: torch.Tensor       # [R] int64 in [0, num_groups)
    response_trajectory: torch.Tensor  # [R] int64, the row each response lies in
    advantages: torch.Tensor           # [R] float32
    num_groups: int

    @property
    def num_responses(self) -> int:
        return self.response_group.shape[0]


def build_policy_batch(trajectories: Sequence[Trajectory], advantages: Sequence[float], level: str,
                       pad_id: int) -> PolicyBatch:
    """Pack trajectories (any subset; their `group` ids are renumbered 0..G'-1 in order of appearance)."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    if len(advantages) != len(trajectories):
        raise ValueError(f"advantages has {len(advantages)} entries for {len(trajectories)} trajectories")
    if not trajectories:
        raise ValueError("trajectories is empty")
    rows = [t.token_ids() for t in trajectories]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    token_response = torch.full((len(rows), width - 1), -1, dtype=torch.long)
    group_ids: Dict[int, int] = {}
    response_group: List[int] = []
    response_trajectory: List[int] = []
    response_advantage: List[float] = []
    for b, (trajectory, row) in enumerate(zip(trajectories, rows)):
        input_ids[b, :len(row)] = torch.tensor(row)
        attention_mask[b, :len(row)] = 1
        group = group_ids.setdefault(trajectory.group, len(group_ids))
        start = len(trajectory.prompt_ids)
        for k, turn in enumerate(trajectory.turns):
            if level == "turn" or k == 0:
                response_group.append(group)
                response_trajectory.append(b)
                response_advantage.append(float(advantages[b]))
            # token at sequence position p is the label of logits position p - 1
            end = start + len(turn.action_ids)
            if turn.trained:
                token_response[b, start - 1:end - 1] = len(response_group) - 1
            start = end + len(turn.observation_ids)
    return PolicyBatch(
        input_ids=input_ids, attention_mask=attention_mask, labels=input_ids[:, 1:].clone(),
        token_response=token_response, response_group=torch.tensor(response_group, dtype=torch.long),
        response_trajectory=torch.tensor(response_trajectory, dtype=torch.long),
        advantages=torch.tensor(response_advantage, dtype=torch.float32), num_groups=len(group_ids),
    )
