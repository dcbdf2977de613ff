"""Batched multi-turn sampling with a KV cache: G trajectories per task instance, all played at once.

Every row of the batch is one episode. Its tokens reach the model in chunks, and the KV cache keeps them:

    chunk 0         <bos> + goal and first observation + ">"
    decode steps    the action's tokens, one per model call, sampled until <end> (or `max_action_tokens`)
    chunk k         the action's last token (not fed yet) + the environment's reply + ">"

Rows move in lockstep but need different numbers of tokens per call (observations differ in length, some
actions end earlier, some episodes are over), so each call left-pads its chunk row by row with <pad> and
masks those positions out. The 2-D attention mask therefore has holes; position ids count real tokens only,
so every row sees exactly the positions it would see alone. The left padding also puts each active row's
newest real token last, where its next-token logits are read (`logits_to_keep=1`: the LM head runs on one
position). Training later rebuilds each trajectory as one compact sequence (see `batching.py`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, List, Sequence

import torch

from .envs import TextEnv
from .model import forward_logits, new_cache
from .tokenizer import WordTokenizer

__all__ = ["Turn", "Trajectory", "rollout", "sample_tasks"]


@dataclass
class Turn:
    """One model action and the environment's reply."""

    action_ids: List[int]        # sampled tokens (trained), normally ending with <end>
    observation_ids: List[int]   # reply + ">" (not trained); empty after the final action
    valid: bool
    trained: bool = True         # False: the action stays in the context but is not trained on


@dataclass
class Trajectory:
    """One episode: `group` is the index of its task instance in the batch (its GRPO group)."""

    group: int
    prompt_ids: List[int]
    turns: List[Turn] = field(default_factory=list)
    reward: float = 0.0          # the outcome: sum of the step rewards (success + invalid-action penalties)
    success: bool = False

    @property
    def num_invalid(self) -> int:
        return sum(not t.valid for t in self.turns)

    def token_ids(self) -> List[int]:
        ids = list(self.prompt_ids)
        for turn in self.turns:
            ids += turn.action_ids + turn.observation_ids
        return ids


def sample_tasks(env: TextEnv, rng: random.Random, count: int) -> List[Any]:
    return [env.sample_task(rng) for _ in range(count)]


class _ChunkFeeder:
    """Feeds per-row token lists into the model, keeping the KV cache, mask and positions of every row."""

    def __init__(self, model: torch.nn.Module, batch: int, pad_id: int) -> None:
        self.model, self.pad_id = model, pad_id
        self.cache = new_cache()
        self.mask = torch.zeros(batch, 0, dtype=torch.long)
        self.seen = torch.zeros(batch, dtype=torch.long)   # real tokens of each row so far

    def __call__(self, chunks: Sequence[List[int]]) -> torch.Tensor:
        """Feed chunks (row b gets chunks[b], possibly empty); returns next-token logits [B, V] (float32)."""
        width = max(len(c) for c in chunks)
        ids = torch.full((len(chunks), width), self.pad_id, dtype=torch.long)
        chunk_mask = torch.zeros(len(chunks), width, dtype=torch.long)
        for b, chunk in enumerate(chunks):
            if chunk:  # left-pad: the newest real token sits in the last column
                ids[b, width - len(chunk):] = torch.tensor(chunk)
                chunk_mask[b, width - len(chunk):] = 1
        positions = (self.seen.unsqueeze(1) + chunk_mask.cumsum(1) - 1).clamp(min=0)
        self.seen += chunk_mask.sum(1)
        self.mask = torch.cat([self.mask, chunk_mask], dim=1)
        logits = forward_logits(self.model, ids, self.mask, position_ids=positions, cache=self.cache,
                                last_only=True)
        return logits[:, -1].float()


@torch.no_grad()
def rollout(model: torch.nn.Module, tokenizer: WordTokenizer, env: TextEnv, tasks: Sequence[Any],
            group_size: int, generator: torch.Generator, *, temperature: float = 1.0,
            max_action_tokens: int = 3) -> List[Trajectory]:
    """Play `group_size` episodes of every task; returns trajectories task-major (group g: rows gG..gG+G-1).

    Actions are sampled from softmax(logits / temperature) over the whole vocabulary (no masking of invalid
    words: the policy has to learn them away, which is what the invalid-action penalty is for), so the
    training pass can recompute exactly the probabilities the samples were drawn from.
    """
    was_training = model.training
    model.eval()
    batch = len(tasks) * group_size
    states = [env.reset(tasks[b // group_size]) for b in range(batch)]
    trajectories = [Trajectory(group=b // group_size,
                               prompt_ids=[tokenizer.bos_id] + tokenizer.observation_ids(env.first_observation(s)))
                    for b, s in enumerate(states)]
    feeder = _ChunkFeeder(model, batch, tokenizer.pad_id)
    pending = [list(t.prompt_ids) for t in trajectories]
    active = list(range(batch))
    while active:
        actions: List[List[int]] = [[] for _ in range(batch)]
        logits = feeder(pending)
        writing = list(active)
        while True:
            probs = torch.softmax(logits[writing] / temperature, dim=-1)
            sampled = torch.multinomial(probs, 1, generator=generator).squeeze(1).tolist()
            for b, token in zip(writing, sampled):
                actions[b].append(token)
            writing = [b for b in writing if actions[b][-1] != tokenizer.end_id
                       and len(actions[b]) < max_action_tokens]
            if not writing:
                break
            in_writing = set(writing)
            logits = feeder([[actions[b][-1]] if b in in_writing else [] for b in range(batch)])
        pending = [[] for _ in range(batch)]
        still_active = []
        for b in active:
            result = env.step(states[b], tokenizer.decode_action(actions[b]))
            observation = [] if result.done else tokenizer.observation_ids(result.observation)
            trajectories[b].turns.append(Turn(actions[b], observation, result.valid))
            trajectories[b].reward += result.reward
            if result.done:
                trajectories[b].success = result.success
            else:
                pending[b] = [actions[b][-1]] + observation  # the action's last token was never fed
                still_active.append(b)
        active = still_active
    model.train(was_training)
    return trajectories
