"""Rollout -> packed loss inputs: token_response / response_group at turn and trajectory level, masks, and the
KV-cache sampler's agreement with a plain full-sequence forward."""

import random

import pytest
import torch

from aem_kernels.train.batching import build_policy_batch
from aem_kernels.train.envs import make_env
from aem_kernels.train.model import ModelSpec, build_policy, forward_logits
from aem_kernels.train.rollout import Trajectory, Turn, rollout
from aem_kernels.train.tokenizer import WordTokenizer

PAD = 0


def _trajectory(group, prompt, turns):
    t = Trajectory(group=group, prompt_ids=list(prompt))
    t.turns = [Turn(list(a), list(o), True) for a, o in turns]
    return t


@pytest.fixture
def two_groups():
    # token ids are arbitrary (> PAD); the layout is what matters
    a = _trajectory(7, [1, 10, 11], [([20, 21, 3], [30, 31, 4]), ([22, 3], [])])        # 2 turns
    b = _trajectory(7, [1, 10], [([23, 3], [])])                                         # 1 turn
    c = _trajectory(9, [1, 12, 13, 14], [([24, 3], [32, 4]), ([25, 26], [33, 4]), ([27, 3], [])])  # 3 turns
    return [a, b, c]


def test_turn_level_mapping(two_groups):
    batch = build_policy_batch(two_groups, [0.5, -1.0, 2.0], "turn", PAD)
    assert batch.input_ids.shape == (3, 14) and batch.labels.shape == batch.token_response.shape == (3, 13)
    # row 0: <1 10 11> [20 21 3] <30 31 4> [22 3]; label position p holds token p + 1
    assert batch.token_response[0].tolist() == [-1, -1, 0, 0, 0, -1, -1, -1, 1, 1, -1, -1, -1]
    assert batch.token_response[1].tolist() == [-1, 2, 2] + [-1] * 10
    assert batch.token_response[2].tolist() == [-1, -1, -1, 3, 3, -1, -1, 4, 4, -1, -1, 5, 5]
    # groups renumbered in order of appearance; advantages shared by a trajectory's turns
    assert batch.response_group.tolist() == [0, 0, 0, 1, 1, 1] and batch.num_groups == 2
    assert batch.response_trajectory.tolist() == [0, 0, 1, 2, 2, 2]
    assert batch.advantages.tolist() == [0.5, 0.5, -1.0, 2.0, 2.0, 2.0]
    # trained labels are exactly the action tokens; padding is masked
    trained = batch.labels[batch.token_response >= 0].tolist()
    assert trained == [20, 21, 3, 22, 3, 23, 3, 24, 3, 25, 26, 27, 3]
    assert batch.attention_mask.sum(1).tolist() == [11, 4, 14]
    assert (batch.input_ids[batch.attention_mask == 0] == PAD).all()


def test_trajectory_level_mapping(two_groups):
    batch = build_policy_batch(two_groups, [0.5, -1.0, 2.0], "trajectory", PAD)
    assert batch.response_group.tolist() == [0, 0, 1] and batch.advantages.tolist() == [0.5, -1.0, 2.0]
    turn = build_policy_batch(two_groups, [0.5, -1.0, 2.0], "turn", PAD)
    # same trained positions; every turn of a row maps to that row's single response
    assert torch.equal(batch.token_response >= 0, turn.token_response >= 0)
    rows = torch.arange(3).unsqueeze(1).expand(3, 13)
    assert torch.equal(batch.token_response, torch.where(turn.token_response >= 0, rows, -1))


def test_untrained_turns_and_bad_arguments(two_groups):
    two_groups[2].turns[1].trained = False
    batch = build_policy_batch(two_groups, [0.0] * 3, "turn", PAD)
    assert (batch.token_response == 4).sum() == 0 and batch.num_responses == 6  # response 4 is empty
    with pytest.raises(ValueError, match="level"):
        build_policy_batch(two_groups, [0.0] * 3, "token", PAD)
    with pytest.raises(ValueError, match="advantages"):
        build_policy_batch(two_groups, [0.0] * 2, "turn", PAD)


@pytest.mark.parametrize("name", ["household", "shop"])
def test_rollout_groups_masks_and_cache_consistency(name):
    env = make_env(name)
    tok = WordTokenizer(env.vocabulary())
    torch.manual_seed(0)
    model = build_policy(ModelSpec(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64),
                         len(tok), tok.pad_id, tok.bos_id, tok.end_id)
    rng = random.Random(0)
    tasks = [env.sample_task(rng) for _ in range(3)]
    trajectories = rollout(model, tok, env, tasks, 2, torch.Generator().manual_seed(0), max_action_tokens=3)
    assert [t.group for t in trajectories] == [0, 0, 1, 1, 2, 2]
    for t in trajectories:
        assert 1 <= len(t.turns) <= env.max_turns and t.turns[-1].observation_ids == []
        assert all(1 <= len(turn.action_ids) <= 3 for turn in t.turns)
        assert all(turn.observation_ids[-1] == tok.prompt_id for turn in t.turns[:-1])
        assert t.reward == pytest.approx(10.0 * t.success - 0.1 * t.num_invalid)
    batch = build_policy_batch(trajectories, [1.0] * 6, "turn", tok.pad_id)
    assert batch.num_responses == sum(len(t.turns) for t in trajectories)
    # the trained labels are exactly the sampled action tokens, turn by turn, in order
    trained = batch.labels[batch.token_response >= 0].tolist()
    assert trained == [i for t in trajectories for turn in t.turns for i in turn.action_ids]
    responses = batch.token_response[batch.token_response >= 0]
    assert responses.tolist() == sorted(responses.tolist())  # row-major order of turns
    assert torch.bincount(responses).tolist() == [len(turn.action_ids) for t in trajectories for turn in t.turns]


def test_cached_sampler_matches_full_forward():
    """The KV-cache path (left-padded chunks, holes in the mask) gives the logits of a compact forward."""
    env = make_env("shop")
    tok = WordTokenizer(env.vocabulary())
    torch.manual_seed(1)
    model = build_policy(ModelSpec(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64),
                         len(tok), tok.pad_id, tok.bos_id, tok.end_id).eval()
    from aem_kernels.train.rollout import _ChunkFeeder
    rows = [[tok.bos_id, 5, 6, 7], [tok.bos_id, 8]], [[9], []], [[10, 11, 12], [13, 14]]
    feeder = _ChunkFeeder(model, 2, tok.pad_id)
    history = [[], []]
    with torch.no_grad():
        for chunks in rows:
            last = feeder(list(chunks))
            for b in range(2):
                history[b] += chunks[b]
                full = forward_logits(model, torch.tensor([history[b]]), torch.ones(1, len(history[b]),
                                                                                  dtype=torch.long))[0, -1]
                if chunks[b]:  # rows fed nothing this call have no new logits to compare
                    # fp32 attention over a masked vs a compact layout: same sums in another order
                    torch.testing.assert_close(last[b], full, rtol=1e-5, atol=1e-5)
