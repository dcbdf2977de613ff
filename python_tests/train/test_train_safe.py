"""The `safe` environment (probe before answering, actions of 3-6 tokens): transitions, rewards, the status
line, the turn limit, its demonstrator and solver, and the packed masks of its variable-length responses."""

import random

import pytest
import torch

from aem_kernels.train.batching import build_policy_batch
from aem_kernels.train.config import preset
from aem_kernels.train.envs import INVALID_OBSERVATION, SafeEnv, make_env
from aem_kernels.train.envs.safe import CAREFUL_START, NOTE_CORRECT, SafeTask
from aem_kernels.train.rollout import Trajectory, Turn
from aem_kernels.train.tokenizer import WordTokenizer


def _safe(code=("3", "1", "4"), note=("3", "1", "5")):
    env = SafeEnv()
    return env, env.reset(SafeTask(code, note))


def test_careful_path_status_line_and_success():
    env, state = _safe()
    assert env.first_observation(state) == "task : open the safe . length 3 note : 3 1 5 - ."
    r = env.step(state, "check p2")
    assert (r.valid, r.reward, r.done) == (True, 0.0, False)
    assert r.observation == "p2 is 1 . length 3 readout : ? 1 ? - ."   # the note is gone once checking starts
    assert env.step(state, "check p2").observation.endswith("readout : ? 1 ? - .")   # again: valid, wasted
    env.step(state, "check p1")
    r = env.step(state, "check p3")
    assert r.observation == "p3 is 4 . length 3 readout : 3 1 4 - ."
    final = env.step(state, "enter 3 1 4")
    assert (final.valid, final.reward, final.done, final.success) == (True, 10.0, True, True)
    assert final.observation == "the safe opens ."
    with pytest.raises(ValueError, match="finished"):
        env.step(state, "check p1")


def test_confident_wrong_answer_ends_the_episode_with_zero():
    env, state = _safe()
    r = env.step(state, "enter 3 1 5")     # the stale note
    assert (r.valid, r.reward, r.done, r.success) == (True, 0.0, True, False) and state.turn == 1
    env, state = _safe(note=("3", "1", "4"))
    assert env.step(state, "enter 3 1 4").reward == 10.0   # a right note pays at once


@pytest.mark.parametrize("action", ["enter 3 1", "enter 3 1 4 1", "enter", "check p4", "check", "check p1 p2",
                                    "enter 3 1 x", "enter 3 1 ?", "open safe", "", "p1"])
def test_invalid_actions_cost_and_keep_state(action):
    env, state = _safe()
    r = env.step(state, action)
    assert (r.valid, r.reward, r.done, r.success) == (False, -0.1, False, False)
    assert r.observation == f"{INVALID_OBSERVATION} length 3 note : 3 1 5 - ."
    assert state.checked == {} and state.turn == 1


def test_turn_limit_fails_with_the_summed_penalties():
    env, state = _safe(code=("2", "2", "2", "2"), note=("2", "2", "2", "2"))
    total = 0.0
    assert env.max_turns == 5   # a 4-digit code: four checks and the answer, no slack
    for k, action in enumerate(["check p1", "nonsense", "check p2", "check p3", "check p4"]):
        r = env.step(state, action)
        total += r.reward
        assert r.done == (k == env.max_turns - 1)
    assert not state.success and total == pytest.approx(-0.1)


def test_tasks_note_and_lengths():
    env = SafeEnv()
    rng = random.Random(0)
    tasks = [env.sample_task(rng) for _ in range(2000)]
    assert {len(t.code) for t in tasks} == {2, 3, 4}
    correct = [t.note == t.code for t in tasks]
    assert abs(sum(correct) / len(tasks) - NOTE_CORRECT) < 0.04
    # a wrong note differs in exactly one digit
    assert all(sum(a != b for a, b in zip(t.note, t.code)) == 1 for t, ok in zip(tasks, correct) if not ok)


def test_solver_always_succeeds_demonstrator_is_mostly_confident_and_noise_hurts():
    env = make_env("safe")
    rng = random.Random(1)
    solved = confident = checked_first = noisy = 0
    n = 400
    for _ in range(n):
        task = env.sample_task(rng)
        state = env.reset(task)
        while not state.done:
            env.step(state, env.solver_action(state))
        solved += state.success
        state = env.reset(task)
        first = env.expert_action(state, rng)
        checked_first += first.startswith("check")
        while not state.done:
            env.step(state, env.expert_action(state, rng))
        confident += state.success
        state = env.reset(task)
        while not state.done:
            env.step(state, env.random_action(rng))
        noisy += state.success
    assert solved == n
    assert abs(checked_first / n - CAREFUL_START) < 0.05
    # the demonstrator succeeds when it checks or when the note is right: about 0.1 + 0.9 * 0.4
    assert 0.38 < confident / n < 0.6 and noisy < 0.05 * n


def test_vocabulary_covers_every_observation_and_action():
    env = make_env("safe")
    tokenizer = WordTokenizer(env.vocabulary())
    rng = random.Random(2)
    for _ in range(100):
        state = env.reset(env.sample_task(rng))
        texts = [env.first_observation(state)]
        while not state.done:
            action = env.random_action(rng) if rng.random() < 0.3 else env.expert_action(state, rng)
            texts += [action, env.step(state, action).observation]
        for text in texts:
            assert tokenizer.unk_id not in tokenizer.encode_words(text), text


def test_variable_length_responses_are_packed_turn_by_turn():
    """check p2 <end> (3 tokens) and enter 3 1 4 <end> (5): each turn its own response at turn level, and one
    response over both at trajectory level; observations and the prompt are never trained."""
    env, state = _safe()
    tok = WordTokenizer(env.vocabulary())
    trajectory = Trajectory(group=0, prompt_ids=[tok.bos_id] + tok.observation_ids(env.first_observation(state)))
    for action in ("check p2", "enter 3 1 4"):
        result = env.step(state, action)
        observation = [] if result.done else tok.observation_ids(result.observation)
        trajectory.turns.append(Turn(tok.action_ids(action), observation, result.valid))
    lengths = [len(t.action_ids) for t in trajectory.turns]
    assert lengths == [3, 5]
    batch = build_policy_batch([trajectory], [1.0], "turn", tok.pad_id)
    tr = batch.token_response[0]
    assert torch.bincount(tr[tr >= 0]).tolist() == lengths
    # labels of response r are exactly its action tokens
    assert tok.decode(batch.labels[0][tr == 0].tolist()) == "check p2 <end>"
    assert tok.decode(batch.labels[0][tr == 1].tolist()) == "enter 3 1 4 <end>"
    assert batch.response_group.tolist() == [0, 0] and batch.advantages.tolist() == [1.0, 1.0]
    whole = build_policy_batch([trajectory], [1.0], "trajectory", tok.pad_id).token_response[0]
    assert int((whole == 0).sum()) == 8 and int((whole > 0).sum()) == 0


def test_the_trainer_caps_actions_by_environment():
    assert preset("compare", env="safe").action_tokens == 6        # enter + 4 digits + <end>
    assert preset("compare", env="household").action_tokens == 3
    assert preset("compare", env="safe", max_action_tokens=4).action_tokens == 4
    # household keeps its warm-start cache key (max_action_tokens 3 as before)
    assert '"max_action_tokens": 3' in preset("compare", env="household").warmstart_key()
