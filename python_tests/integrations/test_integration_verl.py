"""aem_kernels.integrations.verl against the installed verl 0.9.1 (skipped cleanly without it).

Everything is called through verl's own registries (`get_adv_estimator_fn`, `get_policy_loss_fn`) on
verl-shaped [B, T] batches and compared with verl's stock GRPO / RLOO estimators, verl's "vanilla" policy
loss, and this package's public reference (`modulate_advantages`) on independently built packed inputs. The
advantage hook (the estimator's `old_log_probs=` / `entropys=` keywords, passed from the batch by the wrapped
`compute_advantage`) runs through verl's own trainer functions in a child process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import aem_kernels as ak
from helpers import REPO_ROOT, oracle_logprobs_entropy

ROOT = REPO_ROOT
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
EPS32 = torch.finfo(torch.float32).eps


def _python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": ROOT, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


# ---- importing (fresh interpreters) -------------------------------------------------------------------------

def test_importing_the_package_imports_no_framework():
    proc = _python("""
        import sys, aem_kernels, aem_kernels.integrations
        print(sorted(m for m in ("verl", "trl", "liger_kernel") if m in sys.modules))
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_missing_verl_names_the_extra():
    proc = _python("""
        import sys
        sys.modules["verl"] = None  # what an absent package looks like to the import system
        try:
            import aem_kernels.integrations.verl
        except ImportError as error:
            print("ImportError:", error)
    """)
    assert proc.returncode == 0, proc.stderr
    assert "ImportError:" in proc.stdout and "pip install aem-kernels[verl]" in proc.stdout, proc.stdout


# ---- fixtures ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def verl_api():
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    integration = pytest.importorskip("aem_kernels.integrations.verl")
    return core_algos, integration


def _batch(seed: int = 0):
    """A verl-shaped batch: 7 rows of 9 tokens, three uids (one a single-row group), multi-turn masks (tool
    tokens 0 inside a row), right padding and one fully masked row; outcome reward on the last valid token."""
    g = torch.Generator().manual_seed(seed)
    rows, horizon = 7, 9
    mask = torch.ones(rows, horizon)
    mask[0, 6:] = 0                      # padding
    mask[1, 2:4] = 0                     # two turns
    mask[2, 1] = 0; mask[2, 4:6] = 0     # three turns  # noqa: E702
    mask[3] = 0                          # empty row
    mask[4, 0] = 0; mask[4, 8] = 0       # noqa: E702
    mask[6, 3] = 0; mask[6, 7:] = 0      # noqa: E702
    rewards = torch.zeros(rows, horizon)
    last = (mask * torch.arange(horizon)).argmax(dim=1)
    rewards[torch.arange(rows), last] = torch.randn(rows, generator=g).round(decimals=1)
    uid = np.array(["p0", "p1", "p0", "p1", "p0", "p2", "p1"], dtype=object)
    old_log_probs = -3 * torch.rand(rows, horizon, generator=g)
    entropys = 2 * torch.rand(rows, horizon, generator=g)
    return rewards, mask, uid, old_log_probs, entropys


def _turns_by_hand(mask: torch.Tensor, turn_level: bool):
    """(token_response [B, T], row of each response) from the mask, by a plain loop over the tokens."""
    token_response = torch.full(mask.shape, -1, dtype=torch.int64)
    row_of = []
    for b in range(mask.shape[0]):
        inside = False
        for t in range(mask.shape[1]):
            if mask[b, t] != 0:
                if not inside and (turn_level or not any(r == b for r in row_of)):
                    row_of.append(b)
                token_response[b, t] = len(row_of) - 1
            inside = bool(mask[b, t] != 0)
    return token_response, row_of


def _expected_aem(base: torch.Tensor, mask, uid, values, config: ak.AEMConfig, turn_level=True):
    token_response, row_of = _turns_by_hand(mask, turn_level)
    groups = {u: i for i, u in enumerate(sorted(set(uid)))}
    response_group = torch.tensor([groups[uid[b]] for b in row_of], dtype=torch.int64)
    R = len(row_of)
    flat = token_response.reshape(-1)
    if config.uncertainty == "surprisal":
        x = ak.response_surprisal(values.reshape(-1), flat, R, reduction=config.surprisal_reduction)
    else:
        x = ak.response_entropy(values.reshape(-1), flat, R, reduction=config.surprisal_reduction)
    response_adv = torch.stack([base.reshape(-1)[flat == r].mean() for r in range(R)])
    _, metrics = ak.modulate_advantages(response_adv, x, response_group, config, num_groups=len(groups))
    w = metrics["aem/weights"]
    expected = base.clone()
    trained = token_response >= 0
    expected[trained] = base[trained] * w[token_response[trained]]
    return expected


def _algo_config(**aem):
    from omegaconf import OmegaConf

    return OmegaConf.create({"adv_estimator": "aem", "norm_adv_by_std_in_grpo": aem.pop("norm", True),
                             "aem": aem})


# ---- the estimator ----------------------------------------------------------------------------------------

def test_registered_under_verl_names(verl_api):
    core_algos, integration = verl_api
    assert core_algos.get_adv_estimator_fn("aem") is integration.compute_aem_advantage
    assert core_algos.get_policy_loss_fn("aem") is integration.compute_policy_loss_aem


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("turn_level", [True, False])
def test_beta_zero_is_verl_grpo_exactly(verl_api, norm, turn_level):
    core_algos, _ = verl_api
    rewards, mask, uid, old_lp, _ = _batch()
    estimator = core_algos.get_adv_estimator_fn("aem")
    adv, returns = estimator(token_level_rewards=rewards, response_mask=mask, index=uid, old_log_probs=old_lp,
                             config=_algo_config(beta=0.0, norm=norm, turn_level=turn_level))
    stock_adv, stock_returns = core_algos.compute_grpo_outcome_advantage(rewards, mask, uid,
                                                                         norm_adv_by_std_in_grpo=norm)
    assert torch.equal(adv, stock_adv) and torch.equal(returns, stock_returns)


def test_beta_zero_over_rloo_is_verl_rloo(verl_api):
    core_algos, _ = verl_api
    rewards, mask, uid, old_lp, _ = _batch(1)
    cfg = _algo_config(beta=0.0, base_estimator="rloo")
    adv, _ = core_algos.get_adv_estimator_fn("aem")(token_level_rewards=rewards, response_mask=mask, index=uid,
                                                    config=cfg, old_log_probs=old_lp)
    stock, _ = core_algos.get_adv_estimator_fn("rloo")(token_level_rewards=rewards, response_mask=mask,
                                                       index=uid, config=cfg)
    assert torch.equal(adv, stock)


@pytest.mark.parametrize("aem", [
    dict(beta=1.0),
    dict(beta=2.5, turn_level=False),
    dict(beta=0.7, baseline="mean", surprisal_reduction="sum"),
    dict(beta=1.0, uncertainty="entropy"),
    dict(beta=1.5, phi="linear", sign=-1, w_max=1.3, normalize="batch"),
])
def test_modulation_equals_package_reference(verl_api, aem):
    core_algos, integration = verl_api
    rewards, mask, uid, old_lp, entropys = _batch(2)
    turn_level = aem.get("turn_level", True)
    cfg = _algo_config(**dict(aem))
    adv, _ = core_algos.get_adv_estimator_fn("aem")(token_level_rewards=rewards, response_mask=mask, index=uid,
                                                    config=cfg, old_log_probs=old_lp, entropys=entropys)
    base, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, uid)
    aem_config, _, _ = integration.aem_settings(cfg)
    values = entropys if aem_config.uncertainty == "entropy" else old_lp
    expected = _expected_aem(base, mask, uid, values, aem_config, turn_level)
    assert not torch.equal(adv, base)  # the modulation did something on this batch
    torch.testing.assert_close(adv, expected, rtol=2 * EPS32, atol=0)
    metrics = integration.last_metrics()
    assert {"aem/w_std", "aem/drift", "aem/drift_unmodulated", "aem/x_mean"} <= metrics.keys()
    assert metrics["aem/w_std"] > 0


def _data_proto(rewards, mask, uid, **per_token):
    from verl import DataProto

    return DataProto.from_dict(tensors={"token_level_rewards": rewards, "response_mask": mask, **per_token},
                               non_tensors={"uid": uid})


def test_estimator_names_the_missing_values(verl_api):
    core_algos, integration = verl_api
    rewards, mask, uid, old_lp, entropys = _batch(3)
    estimator = core_algos.get_adv_estimator_fn("aem")
    estimator(token_level_rewards=rewards, response_mask=mask, index=uid, config=_algo_config(beta=1.0),
              old_log_probs=old_lp)
    assert integration.last_metrics()
    # verl's generic call (no per-token values): a ValueError naming the keyword and the hook
    with pytest.raises(ValueError, match=r"needs `old_log_probs=` .*\(7, 9\).*VERL_USE_EXTERNAL_MODULES"):
        estimator(token_level_rewards=rewards, response_mask=mask, index=uid, config=_algo_config(beta=1.0))
    assert integration.last_metrics() == {}  # a failed call leaves no previous batch's metrics behind
    with pytest.raises(ValueError, match="needs `entropys=`"):
        estimator(token_level_rewards=rewards, response_mask=mask, index=uid, old_log_probs=old_lp,
                  config=_algo_config(uncertainty="entropy"))
    with pytest.raises(TypeError, match=r"old_log_probs must be a \[B, T\] tensor, got ndarray"):
        estimator(token_level_rewards=rewards, response_mask=mask, index=uid, config=_algo_config(),
                  old_log_probs=old_lp.numpy())


@pytest.mark.parametrize("aem, entropy_key", [(dict(beta=1.0), None),
                                              (dict(beta=1.3, uncertainty="entropy"), "entropys"),
                                              (dict(beta=0.8, uncertainty="entropy"), "entropy")])
def test_compute_advantage_hands_the_batch_values(verl_api, aem, entropy_key):
    """The module's compute_advantage (what verl's trainer calls once wrapped) on a verl DataProto."""
    core_algos, integration = verl_api
    rewards, mask, uid, old_lp, entropys = _batch(4)
    per_token = {"old_log_probs": old_lp, **({entropy_key: entropys} if entropy_key else {})}
    data = _data_proto(rewards, mask, uid, **per_token)
    assert integration.advantage_inputs(data).keys() == {"old_log_probs", *(["entropys"] if entropy_key else [])}
    cfg = _algo_config(**aem)
    out = integration.compute_advantage(data, adv_estimator="aem", config=cfg)
    assert out is data
    base, base_returns = core_algos.compute_grpo_outcome_advantage(rewards, mask, uid)
    aem_config, _, _ = integration.aem_settings(cfg)
    expected = _expected_aem(base, mask, uid, entropys if entropy_key else old_lp, aem_config)
    assert not torch.equal(out.batch["advantages"], base)
    torch.testing.assert_close(out.batch["advantages"], expected, rtol=2 * EPS32, atol=0)
    assert torch.equal(out.batch["returns"], base_returns)
    explicit, _ = core_algos.get_adv_estimator_fn("aem")(token_level_rewards=rewards, response_mask=mask,
                                                         index=uid, config=cfg, **integration.advantage_inputs(data))
    assert torch.equal(out.batch["advantages"], explicit)
    with pytest.raises(ValueError, match="needs `old_log_probs=`"):
        integration.compute_advantage(_data_proto(rewards, mask, uid), adv_estimator="aem",
                                      config=_algo_config(beta=1.0))


# verl's trainer modules import, at import, the packages of its HTTP rollout server (cachetools, fastapi,
# uvicorn) and of v1's transfer queue; none takes part in compute_advantage, so where one is not installed a
# stand-in takes its name (in the child process only) and verl's own trainer code runs unchanged.
_VERL_TRAINER_RUN = """
    import importlib.util, sys, types
    for name in ("cachetools", "fastapi", "uvicorn", "transfer_queue"):
        if importlib.util.find_spec(name) is None:
            stub = types.ModuleType(name)
            stub.__path__ = []
            def stand_in(attr):
                if attr.startswith("__"):
                    raise AttributeError(attr)
                return type(attr, (), {{"__init__": lambda self, *args, **kwargs: None}})
            stub.__getattr__ = stand_in
            sys.modules[name] = stub
    import torch, verl
    from omegaconf import OmegaConf
    from verl import DataProto
    from verl.trainer.ppo import core_algos
    hook_first = "aem_kernels.integrations.verl" in sys.modules and "verl.trainer.ppo.ray_trainer" not in sys.modules
    import verl.trainer.ppo.ray_trainer as ray_trainer, verl.trainer.ppo.v1.utils as v1_utils
    import aem_kernels.integrations.verl
    b = torch.load({inputs!r})
    def data(**per_token):
        return DataProto.from_dict(tensors={{"token_level_rewards": b["rewards"], "response_mask": b["mask"],
                                             **per_token}}, non_tensors={{"uid": b["uid"]}})
    cfg = OmegaConf.create({{"adv_estimator": "aem", "norm_adv_by_std_in_grpo": True, "aem": {{"beta": 1.0}}}})
    out = {{"hook_first": hook_first, "same_in_v1": v1_utils.compute_advantage is ray_trainer.compute_advantage,
           "verl_module": ray_trainer.compute_advantage.__wrapped__.__module__}}
    # v0's fit and v1's _compute_advantage, as verl's trainers call them
    out["v0"] = ray_trainer.compute_advantage(data(old_log_probs=b["old_lp"]), adv_estimator="aem", gamma=1.0,
                                              lam=1.0, num_repeat=3, norm_adv_by_std_in_grpo=True,
                                              config=cfg).batch["advantages"]
    out["v1"] = v1_utils.compute_advantage_for_multi_trajectories(
        data(old_log_probs=b["old_lp"]), batch_keys=[], adv_estimator="aem", config=cfg).batch["advantages"]
    # other estimators: verl's own code paths (its GRPO branch and its generic branch)
    for name in ("grpo", "rloo"):
        got = ray_trainer.compute_advantage(data(), adv_estimator=name, config=cfg).batch["advantages"]
        stock = core_algos.get_adv_estimator_fn(name)(token_level_rewards=b["rewards"], response_mask=b["mask"],
                                                      index=b["uid"], config=cfg)[0]
        out[name] = bool(torch.equal(got, stock))
    try:  # verl's compute_advantage without the wrap: the estimator says what it lacks
        ray_trainer.compute_advantage.__wrapped__(data(old_log_probs=b["old_lp"]), adv_estimator="aem", config=cfg)
    except ValueError as error:
        out["unwrapped_error"] = str(error)
    torch.save(out, {result!r})
"""


@pytest.mark.parametrize("order", ["external_modules", "imported_after_the_trainer"])
def test_through_verl_compute_advantage(verl_api, tmp_path, order):
    """verl 0.9.1's own compute_advantage (v0's call and v1's compute_advantage_for_multi_trajectories) with
    the wrap in place, whether `import verl` imports this module before the trainer or it comes after."""
    rewards, mask, uid, old_lp, _ = _batch(8)
    inputs, result = str(tmp_path / "inputs.pt"), str(tmp_path / "result.pt")
    torch.save({"rewards": rewards, "mask": mask, "uid": list(uid), "old_lp": old_lp}, inputs)
    env = {"VERL_USE_EXTERNAL_MODULES": "aem_kernels.integrations.verl"} if order == "external_modules" else {}
    proc = _python(_VERL_TRAINER_RUN.format(inputs=inputs, result=result), **env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = torch.load(result)
    assert out["hook_first"] == (order == "external_modules")
    assert out["same_in_v1"] and out["verl_module"] == "verl.trainer.ppo.ray_trainer"
    base, _ = verl_api[0].compute_grpo_outcome_advantage(rewards, mask, uid)
    aem_config, _, _ = verl_api[1].aem_settings(_algo_config(beta=1.0))
    expected = _expected_aem(base, mask, uid, old_lp, aem_config)
    for path in ("v0", "v1"):
        torch.testing.assert_close(out[path], expected, rtol=2 * EPS32, atol=0)
    assert out["grpo"] and out["rloo"]
    assert "needs `old_log_probs=`" in out["unwrapped_error"]


@pytest.mark.parametrize("aem, match", [
    (dict(uncertainty="entropy"), "surprisal"),
    (dict(bogus=1), "unknown keys"),
    (dict(base_estimator="aem"), "base_estimator"),
    (dict(turn_level="yes"), "turn_level"),
    (dict(beta=-1.0), "beta"),
])
def test_bad_settings_raise(verl_api, aem, match):
    core_algos, _ = verl_api
    rewards, mask, uid, old_lp, _ = _batch()
    with pytest.raises((ValueError, TypeError), match=match):
        core_algos.get_adv_estimator_fn("aem")(token_level_rewards=rewards, response_mask=mask, index=uid,
                                               config=_algo_config(**aem), old_log_probs=old_lp)


def test_bad_inputs_raise(verl_api):
    _, integration = verl_api
    rewards, mask, uid, old_lp, _ = _batch()
    cfg = ak.AEMConfig(uncertainty="surprisal")
    with pytest.raises(ValueError, match="index"):
        integration.modulate_token_advantages(rewards, mask, None, old_lp, cfg)
    with pytest.raises(ValueError, match="one uid per row"):
        integration.modulate_token_advantages(rewards, mask, uid[:-1], old_lp, cfg)
    with pytest.raises(ValueError, match="shape"):
        integration.modulate_token_advantages(rewards, mask, uid, old_lp[:, :-1], cfg)
    with pytest.raises(ValueError, match="NaN|finite"):
        integration.modulate_token_advantages(rewards, mask, uid, torch.full_like(old_lp, float("nan")), cfg)


# ---- the policy loss --------------------------------------------------------------------------------------

def _actor_config(**overrides):
    from verl.workers.config import ActorConfig

    return ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=2, rollout_n=1, **overrides)


GLOBAL_INFOS = [
    {},
    {"dp_size": 1, "batch_num_tokens": None, "global_batch_size": None, "loss_scale_factor": None},
    {"dp_size": 4, "batch_num_tokens": 123, "global_batch_size": 17, "loss_scale_factor": None},
    {"dp_size": 2, "batch_num_tokens": 50, "global_batch_size": 11, "loss_scale_factor": 32},
]


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("info", range(len(GLOBAL_INFOS)))
@pytest.mark.parametrize("with_is_weights", [False, True])
def test_policy_loss_equals_vanilla(verl_api, mode, info, with_is_weights):
    core_algos, _ = verl_api
    g = torch.Generator().manual_seed(info)
    rewards, mask, uid, old_lp, _ = _batch(5)
    mask[3, 2] = 1  # verl's token-mean divides by the mask's count: keep the batch non-empty for both
    advantages = torch.randn(mask.shape, generator=g) * mask
    # ratios spread over both clip edges and the dual clip (|log ratio| up to ~2)
    log_prob = (old_lp + 0.8 * torch.randn(mask.shape, generator=g)).requires_grad_()
    is_weights = torch.rand(mask.shape, generator=g) + 0.5 if with_is_weights else None
    config = _actor_config(clip_ratio_low=0.2, clip_ratio_high=0.28)
    config.global_batch_info.update(GLOBAL_INFOS[info])

    results = []
    for name in ("aem", "vanilla"):
        loss, metrics = core_algos.get_policy_loss_fn(name)(old_lp, log_prob, advantages, mask, mode, config,
                                                            is_weights)
        grad, = torch.autograd.grad(loss, log_prob)
        results.append((loss, metrics, grad))
    (loss, metrics, grad), (v_loss, v_metrics, v_grad) = results
    # The package sums c_t * v_t, verl sums v_t then divides: a reassociation, so the two agree to fp32
    # rounding of the sum of the aggregated terms' magnitudes (a few ulp each), and the gradients per element.
    scale = (v_grad.abs() * (log_prob - old_lp).abs().clamp(min=1)).sum() + v_loss.abs()
    assert abs(loss.item() - v_loss.item()) <= 8 * EPS32 * max(scale.item(), v_loss.abs().item(), 1e-30)
    torch.testing.assert_close(grad, v_grad, rtol=4 * EPS32, atol=0)
    assert metrics.keys() == v_metrics.keys()
    for key in metrics:
        assert metrics[key] == pytest.approx(v_metrics[key], rel=1e-6, abs=1e-7), key
    assert metrics["actor/pg_clipfrac"] > 0 and metrics["actor/pg_clipfrac_lower"] > 0  # both clips exercised


def test_policy_loss_checks_inputs(verl_api):
    core_algos, _ = verl_api
    fn = core_algos.get_policy_loss_fn("aem")
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="actor config"):
        fn(x, x, x, x, "token-mean", None)
    with pytest.raises(ValueError, match="shape"):
        fn(x, x, torch.zeros(2, 4), x, "token-mean", _actor_config())
    with pytest.raises(ValueError, match="loss_agg_mode"):
        fn(x, x, x, x, "seq-sum", _actor_config())
    config = _actor_config()
    config.global_batch_info.update({"dp_size": 2})
    with pytest.raises(ValueError, match="batch_num_tokens"):
        fn(x, x, x, torch.ones(2, 3), "token-mean", config)


# ---- the token ops ----------------------------------------------------------------------------------------

def test_patched_token_ops_match_verl(verl_api):
    _, integration = verl_api
    verl_F = pytest.importorskip("verl.utils.torch_functional")
    engine = pytest.importorskip("verl.workers.engine.fsdp.transformer_impl")
    saved = (engine.logprobs_from_logits, verl_F.entropy_from_logits, verl_F.entropy_from_logits_with_chunking)
    g = torch.Generator().manual_seed(6)
    logits = (torch.randn(37, 1031, generator=g) * 30).requires_grad_()
    labels = torch.randint(0, 1031, (37,), generator=g)
    ref_lp, ref_h = oracle_logprobs_entropy(logits.detach(), labels)
    ref_h = oracle_logprobs_entropy(logits.detach(), None)[1]
    eager_lp = torch.log_softmax(logits.detach(), -1).gather(-1, labels[:, None]).squeeze(-1)
    eager_h = saved[1](logits.detach())
    try:
        integration.patch_token_ops()
        assert engine.logprobs_from_logits is not saved[0]
        lp = engine.logprobs_from_logits(logits=logits, labels=labels, inplace_backward=False)
        h = verl_F.entropy_from_logits(logits)
        h_chunked = verl_F.entropy_from_logits_with_chunking(logits, chunk_size=8)
    finally:
        engine.logprobs_from_logits, verl_F.entropy_from_logits, verl_F.entropy_from_logits_with_chunking = saved
    for got, eager, ref in ((lp, eager_lp, ref_lp), (h, eager_h, ref_h), (h_chunked, eager_h, ref_h)):
        bound = 3 * (eager.double() - ref).abs().max() + 1e-5
        assert (got.detach().double() - ref).abs().max() <= bound
    grad, = torch.autograd.grad((lp * 0.3 + h).sum(), logits)
    x = logits.detach().double().requires_grad_()
    ref_grad, = torch.autograd.grad((torch.log_softmax(x, -1).gather(-1, labels[:, None]).squeeze(-1) * 0.3
                                     + oracle_logprobs_entropy(x, None)[1]).sum(), x)
    y = logits.detach().clone().requires_grad_()
    eager_grad, = torch.autograd.grad((torch.log_softmax(y, -1).gather(-1, labels[:, None]).squeeze(-1) * 0.3
                                       + saved[1](y)).sum(), y)
    assert (grad.double() - ref_grad).abs().max() <= 3 * (eager_grad.double() - ref_grad).abs().max() + 1e-5


def test_verl_external_modules_switch(verl_api):
    engine = pytest.importorskip("verl.workers.engine.fsdp.transformer_impl")
    # imported here without the variable (conftest does not set it): verl's own functions stay in place
    assert os.environ.get("AEM_KERNELS_VERL_TOKEN_OPS", "0") != "1"
    assert engine.logprobs_from_logits.__module__ == "verl.utils.torch_functional"
    # verl's own switch: VERL_USE_EXTERNAL_MODULES makes `import verl` import the integration in every process
    proc = _python("""
        import verl
        from verl.trainer.ppo.core_algos import get_adv_estimator_fn, get_policy_loss_fn
        import verl.workers.engine.fsdp.transformer_impl as engine, verl.utils.torch_functional as F
        for fn in (get_adv_estimator_fn("aem"), get_policy_loss_fn("aem"), engine.logprobs_from_logits,
                   F.entropy_from_logits, F.entropy_from_logits_with_chunking):
            print(getattr(fn, "__wrapped__", fn).__module__)
    """, AEM_KERNELS_VERL_TOKEN_OPS="1", VERL_USE_EXTERNAL_MODULES="aem_kernels.integrations.verl")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["aem_kernels.integrations.verl." + name for name in
                                   ("estimator", "policy_loss", "token_ops", "token_ops", "token_ops")]


def test_example_runs(verl_api, capsys):
    import runpy

    runpy.run_path(os.path.join(ROOT, "examples", "verl_aem.py"), run_name="example")["main"]()
    out = capsys.readouterr().out
    assert "beta=1.0: weights" in out and out.count("policy loss") == 3
    beta0, beta1 = out.split("beta=1.0: weights")
    assert "aem/w_std 0.000" in beta0 and "aem/w_std 0.000" not in beta1  # beta 0 leaves the weights at 1


def test_readme_overrides_compose_with_verl_config(verl_api):
    """The command line of the README/example, composed by Hydra against verl's own ppo_trainer config."""
    import runpy

    hydra = pytest.importorskip("hydra")
    import verl

    overrides = runpy.run_path(os.path.join(ROOT, "examples", "verl_aem.py"), run_name="example")["OVERRIDES"]
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with hydra.initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = hydra.compose(config_name="ppo_trainer", overrides=overrides)
    assert cfg.actor_rollout_ref.actor.policy_loss.loss_mode == "aem"
    env = cfg.ray_kwargs.ray_init.runtime_env.env_vars
    assert env.VERL_USE_EXTERNAL_MODULES == "aem_kernels.integrations.verl"
    core_algos, integration = verl_api
    aem_config, base, turn_level = integration.aem_settings(cfg.algorithm)
    assert (aem_config.beta, aem_config.uncertainty, base, turn_level) == (1.0, "surprisal", "grpo", True)
    rewards, mask, uid, old_lp, _ = _batch(7)
    adv, _ = core_algos.get_adv_estimator_fn(cfg.algorithm.adv_estimator)(
        token_level_rewards=rewards, response_mask=mask, index=uid, config=cfg.algorithm, old_log_probs=old_lp)
    base_adv, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, uid)
    torch.testing.assert_close(adv, _expected_aem(base_adv, mask, uid, old_lp, aem_config), rtol=2 * EPS32, atol=0)
