"""Environment logic of the reference trainer: transitions, rewards, invalid actions, termination."""

import random

import pytest

from aem_kernels.train.envs import INVALID_OBSERVATION, HouseholdEnv, ShopEnv, make_env
from aem_kernels.train.envs.household import HouseholdTask
from aem_kernels.train.envs.shop import ShopTask
from aem_kernels.train.tokenizer import WordTokenizer


def _household(treatment="heat"):
    # mug (goal) on the counter, apple in the drawer, egg on the table; goal: a hot mug in the cabinet
    task = HouseholdTask("mug", "cabinet", treatment, (("mug", "counter"), ("apple", "drawer"), ("egg", "table")))
    env = HouseholdEnv()
    return env, env.reset(task)


def test_household_solution_path_rewards_and_termination():
    env, state = _household()
    assert env.first_observation(state).endswith("at middle . holding nothing - . goal : hot mug cabinet .")
    steps = [("go counter", "at counter : mug .", "nothing -"), ("take mug", "took mug .", "mug plain"),
             ("go microwave", "at microwave : nothing .", "mug plain"), ("heat mug", "mug is hot .", "mug hot"),
             ("go cabinet", "at cabinet : nothing .", "mug hot")]
    for action, reply, held in steps:
        result = env.step(state, action)
        assert (result.valid, result.reward, result.done, result.success) == (True, 0.0, False, False)
        assert result.observation == f"{reply} holding {held} . goal : hot mug cabinet ."
    final = env.step(state, "put mug")
    assert (final.valid, final.reward, final.done, final.success) == (True, 10.0, True, True)
    assert final.observation == "mug in cabinet ."  # no reminder once the episode is over
    with pytest.raises(ValueError, match="finished"):
        env.step(state, "go counter")


@pytest.mark.parametrize("action", ["take mug", "put mug", "heat mug", "fly away", "go moon", "go", "",
                                    "take apple", "take bread", "go counter now"])
def test_household_invalid_actions_cost_and_keep_state(action):
    env, state = _household()
    before = (state.place, state.holding, dict(state.where))
    result = env.step(state, action)  # at "middle", holding nothing: none of these can succeed
    assert not result.valid and result.reward == pytest.approx(-0.1)
    assert result.observation.startswith(INVALID_OBSERVATION)
    assert (state.place, state.holding, dict(state.where)) == before and state.turn == 1


def test_household_treatment_is_required_and_replaced():
    env, state = _household("clean")
    for action in ("go counter", "take mug", "go cabinet"):
        env.step(state, action)
    result = env.step(state, "put mug")  # not cleaned yet
    assert result.valid and not result.success and result.reward == 0.0
    assert state.where["mug"] == "cabinet" and state.holding is None
    assert not env.step(state, "clean mug").valid  # not holding it, not at the sink
    for action in ("take mug", "go sink", "clean mug", "go fridge", "cool mug", "go cabinet"):
        assert env.step(state, action).valid
    assert not env.step(state, "put mug").success  # cold now: the last treatment counts


def test_household_put_needs_an_empty_storage_place():
    env, state = _household()
    for action in ("go counter", "take mug", "go drawer"):
        env.step(state, action)
    assert not env.step(state, "put mug").valid  # the apple is there
    env.step(state, "go sink")
    assert not env.step(state, "put mug").valid  # not a storage place


def test_household_turn_limit_fails_with_zero_outcome():
    env, state = _household()
    total = 0.0
    for turn in range(env.max_turns):
        result = env.step(state, "go drawer")
        total += result.reward
        assert result.done == (turn == env.max_turns - 1)
    assert total == 0.0 and not state.success


def _shop():
    catalogue = (("red", "shirt", "small"), ("blue", "hat", "large"), ("red", "shirt", "large"),
                 ("blue", "shirt", "large"), ("green", "bag", "small"), ("red", "hat", "large"),
                 ("black", "shoes", "medium"), ("white", "jacket", "small"))
    env = ShopEnv()
    return env, env.reset(ShopTask(("red", "shirt", "large"), catalogue))


def test_shop_pages_and_success():
    env, state = _shop()
    assert env.step(state, "buy").valid is False          # no item page yet
    r = env.step(state, "search shirt")
    assert r.observation == "results : red shirt i1 , red shirt i3 , blue shirt i4 . goal : red shirt large ."
    assert env.step(state, "click i2").valid is False      # not in the results
    r = env.step(state, "click i1")
    assert r.valid and r.observation.startswith("i1 : red shirt , size small .")
    assert env.step(state, "back").observation.startswith("results : red shirt i1 seen , red shirt i3 ,")
    env.step(state, "click i3")
    final = env.step(state, "buy")
    assert (final.valid, final.success, final.done, final.reward) == (True, True, True, 10.0)


def test_shop_wrong_purchase_is_failure():
    env, state = _shop()
    for action in ("search red", "click i1"):
        assert env.step(state, action).valid
    final = env.step(state, "buy")
    assert final.done and not final.success and final.reward == 0.0


def test_shop_results_are_capped():
    env, state = _shop()
    r = env.step(state, "search large")  # four large items: i2 i3 i4 i6 listed
    assert r.observation.startswith("results : blue hat i2 , red shirt i3 , blue shirt i4 , red hat i6 .")


@pytest.mark.parametrize("name", ["household", "shop"])
def test_expert_always_succeeds_and_noise_hurts(name):
    env = make_env(name)
    rng = random.Random(0)
    successes = {0.0: 0, 1.0: 0}
    for _ in range(100):
        task = env.sample_task(rng)
        for noise in successes:
            state = env.reset(task)
            while not state.done:
                action = env.random_action(rng) if rng.random() < noise else env.expert_action(state, rng)
                env.step(state, action)
            successes[noise] += state.success
    assert successes[0.0] == 100 and successes[1.0] < 10


@pytest.mark.parametrize("name", ["household", "shop"])
def test_vocabulary_covers_every_observation_and_action(name):
    env = make_env(name)
    tokenizer = WordTokenizer(env.vocabulary())
    rng = random.Random(1)
    for _ in range(50):
        state = env.reset(env.sample_task(rng))
        texts = [env.first_observation(state)]
        while not state.done:
            action = env.random_action(rng) if rng.random() < 0.3 else env.expert_action(state, rng)
            texts += [action, env.step(state, action).observation]
        for text in texts:
            assert tokenizer.unk_id not in tokenizer.encode_words(text), text
    assert tokenizer.hf.convert_tokens_to_ids(["<pad>", "<end>"]) == [tokenizer.pad_id, tokenizer.end_id]


def test_binary_reward_scheme_and_bad_names():
    env = make_env("shop", reward_scheme="binary")
    _, state = _shop()
    assert env.step(state, "nonsense").reward == 0.0
    with pytest.raises(ValueError, match="reward_scheme"):
        make_env("shop", reward_scheme="dense")
    with pytest.raises(ValueError, match="env"):
        make_env("alfworld")
