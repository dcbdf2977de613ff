"""`aem_policy_loss`: equality with verl's actor loss at beta = 0, the input forms, options and gradients.

The verl formulas below are written from verl 0.9.1's documented behaviour (compute_policy_loss_vanilla, agg_loss,
kl_penalty; masked_mean divides by mask.sum() + 1e-8); test_compat_verl.py checks against the installed verl.
"""

import itertools

import pytest
import torch

import aem_kernels as ak

D = torch.float64
MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def verl_masked_mean(values, mask):
    return (values * mask).sum() / (mask.sum() + 1e-8)


def verl_agg(loss_mat, mask, mode):
    """verl 0.9.1's agg_loss without global normalisers (test_compat_verl.py checks the real one)."""
    if mode == "token-mean":
        return (loss_mat * mask).sum() / mask.sum()
    seq_sums = (loss_mat * mask).sum(-1)
    nonempty = mask.sum(-1) > 0
    if mode == "seq-mean-token-sum":
        return seq_sums[nonempty].sum() / nonempty.sum()
    if mode == "seq-mean-token-mean":
        return (seq_sums / mask.sum(-1))[nonempty].sum() / nonempty.sum()
    if mode == "seq-mean-token-sum-norm":
        return seq_sums[nonempty].sum() / nonempty.sum() / mask.shape[-1]
    raise ValueError(mode)


def verl_kl(logprob, ref, kind):
    if kind == "k1":
        return logprob - ref
    if kind == "k2":
        return 0.5 * (logprob - ref) ** 2
    kl = (ref - logprob).clamp(-20, 20)
    return (kl.exp() - kl - 1).clamp(-10, 10)


def verl_actor_loss(logits, labels, advantages, mask, old, ref, cfg):
    log_p = torch.log_softmax(logits / cfg.temperature, -1)
    logprob = log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = torch.logsumexp(logits / cfg.temperature, -1) - (log_p.exp() * logits / cfg.temperature).sum(-1)
    old = logprob.detach() if old is None else old
    neg_kl = (logprob - old).clamp(-20, 20)
    ratio = neg_kl.exp()
    loss1 = -advantages * ratio
    loss2 = -advantages * ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high)
    clipped1 = torch.maximum(loss1, loss2)
    loss3 = -advantages * cfg.dual_clip
    pg = torch.where(advantages < 0, torch.minimum(loss3, clipped1), clipped1)
    loss = verl_agg(pg, mask, cfg.loss_agg_mode) - cfg.entropy_coef * verl_agg(entropy, mask, cfg.loss_agg_mode)
    if cfg.kl_coef:
        loss = loss + cfg.kl_coef * verl_agg(verl_kl(logprob, ref, cfg.kl_type), mask, cfg.loss_agg_mode)
    metrics = {"actor/pg_clipfrac": verl_masked_mean((loss2 > loss1).to(D), mask),
               "actor/ppo_kl": verl_masked_mean(-neg_kl, mask),
               "actor/pg_clipfrac_lower": verl_masked_mean(((clipped1 > loss3) & (advantages < 0)).to(D), mask)}
    return loss, metrics


def _padded_batch(seed=0, rows=6, horizon=9, vocab=31):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, horizon, vocab, generator=g, dtype=D) * 2
    labels = torch.randint(0, vocab, (rows, horizon), generator=g)
    lengths = torch.randint(2, horizon + 1, (rows,), generator=g)
    starts = torch.randint(0, 2, (rows,), generator=g)
    pos = torch.arange(horizon)
    mask = (pos >= starts[:, None]) & (pos < (starts + lengths).clamp(max=horizon)[:, None])
    rewards = torch.randn(rows, generator=g, dtype=D)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])[:rows]
    true_lp = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    # old/ref log-probs off by up to +-0.5 so both clip sides and the dual clip are exercised
    old = true_lp + (torch.rand(rows, horizon, generator=g, dtype=D) - 0.5)
    ref = true_lp + 0.3 * torch.randn(rows, horizon, generator=g, dtype=D)
    return logits, labels, mask, rewards, groups, old, ref


@pytest.mark.parametrize("mode, kl_type", list(itertools.product(MODES, ["k1", "k2", "k3"])))
def test_beta_zero_equals_verl_actor_loss_and_gradient(mode, kl_type):
    logits, labels, mask, rewards, groups, old, ref = _padded_batch()
    cfg = ak.AEMConfig(beta=0.0, loss_agg_mode=mode, kl_type=kl_type, kl_coef=0.05, entropy_coef=0.01,
                       temperature=0.8, clip_low=0.2, clip_high=0.28)
    token_adv = rewards[:, None] * mask  # verl broadcasts outcome advantages over the response mask
    x_ours = logits.clone().requires_grad_(True)
    loss, metrics = ak.aem_policy_loss(x_ours, labels, token_adv, response_mask=mask, response_group=groups,
                                       old_logprobs=old, ref_logprobs=ref, config=cfg, backend="torch")
    loss.backward()
    x_verl = logits.clone().requires_grad_(True)
    loss_verl, metrics_verl = verl_actor_loss(x_verl, labels, token_adv, mask.to(D), old, ref, cfg)
    loss_verl.backward()
    # verl's masked_mean adds 1e-8 to the token count (>= 12 here): a relative difference below 1e-9.
    torch.testing.assert_close(loss, loss_verl, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(x_ours.grad, x_verl.grad, rtol=1e-9, atol=1e-12)
    for key, value in metrics_verl.items():
        torch.testing.assert_close(metrics[key], value, rtol=1e-9, atol=1e-12)
    assert 0 < metrics["actor/pg_clipfrac"] < 1 and metrics["actor/pg_clipfrac_lower"] >= 0


def test_token_sum_and_on_policy_reduces_to_minus_adv_logprob():
    logits, labels, mask, rewards, groups, _, _ = _padded_batch(seed=1)
    cfg = ak.AEMConfig(beta=0.0, loss_agg_mode="token-sum")
    x = logits.clone().requires_grad_(True)
    loss, metrics = ak.aem_policy_loss(x, labels, rewards, response_mask=mask, response_group=groups, config=cfg,
                                       backend="torch")
    loss.backward()
    # rho = 1: the value is -sum A, the gradient that of -sum A * logprob (the REINFORCE form)
    torch.testing.assert_close(loss, -(rewards[:, None] * mask).sum(), rtol=1e-12, atol=1e-12)
    y = logits.clone().requires_grad_(True)
    logprob = torch.log_softmax(y, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    (-(rewards[:, None] * logprob * mask).sum()).backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-12, atol=1e-13)
    assert metrics["actor/ppo_kl"] == 0 and metrics["actor/pg_clipfrac"] == 0


def test_aem_equals_verl_loss_on_modulated_advantages():
    logits, labels, mask, rewards, groups, old, _ = _padded_batch(seed=2)
    cfg = ak.AEMConfig(beta=1.5)
    loss, metrics = ak.aem_policy_loss(logits, labels, rewards, response_mask=mask, response_group=groups,
                                       old_logprobs=old, config=cfg, backend="torch")
    entropy = ak.entropy_from_logits(logits)
    token_response = torch.where(mask, torch.arange(6)[:, None], -1)
    x = ak.response_entropy(entropy, token_response, 6)
    modulated, _ = ak.modulate_advantages(rewards, x, groups, cfg)
    expected, _ = verl_actor_loss(logits, labels, modulated[:, None] * mask, mask.to(D), old, None, cfg)
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(metrics["aem/weights"], modulated / rewards, rtol=1e-12, atol=0)


def test_packed_padded_and_turn_forms_agree():
    logits, labels, mask, rewards, groups, old, _ = _padded_batch(seed=3)
    cfg = ak.AEMConfig(beta=1.0, loss_agg_mode="seq-mean-token-mean")
    padded, m_pad = ak.aem_policy_loss(logits, labels, rewards, response_mask=mask, response_group=groups,
                                       old_logprobs=old, config=cfg, backend="torch")
    token_response = torch.where(mask, torch.arange(6)[:, None], -1)
    packed, m_pack = ak.aem_policy_loss(logits.reshape(-1, 31), labels.reshape(-1), rewards,
                                        token_response=token_response.reshape(-1), response_group=groups,
                                        old_logprobs=old.reshape(-1), config=cfg, backend="torch")
    turn_ids = torch.where(mask, 0, -1)
    turns, m_turn = ak.aem_policy_loss(logits, labels, rewards, turn_ids=turn_ids, response_group=groups,
                                       old_logprobs=old, config=cfg, backend="torch")
    torch.testing.assert_close(packed, padded, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(turns, padded, rtol=1e-13, atol=1e-14)
    for key in m_pad:
        torch.testing.assert_close(m_pack[key], m_pad[key], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(m_turn[key], m_pad[key], rtol=1e-12, atol=1e-14)


def test_turn_level_responses_inherit_group_and_trajectory_advantage():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 8, 11, generator=g, dtype=D)
    labels = torch.randint(0, 11, (2, 8), generator=g)
    # row 0: turns 0 and 1 separated by an observation; row 1: one turn
    turn_ids = torch.tensor([[-1, 0, 0, -1, -1, 1, 1, 1], [-1, -1, 0, 0, 0, -1, -1, -1]])
    token_response, turns = ak.turn_ids_to_token_response(turn_ids)
    assert turns.tolist() == [2, 1]
    assert token_response.tolist() == [[-1, 0, 0, -1, -1, 1, 1, 1], [-1, -1, 2, 2, 2, -1, -1, -1]]
    adv = torch.tensor([1.0, -0.5], dtype=D)
    cfg = ak.AEMConfig(beta=2.0)
    loss, metrics = ak.aem_policy_loss(logits, labels, adv, turn_ids=turn_ids, response_group=torch.tensor([0, 0]),
                                       config=cfg, backend="torch")
    packed, m_packed = ak.aem_policy_loss(logits.reshape(16, 11), labels.reshape(16), adv[[0, 0, 1]],
                                          token_response=token_response.reshape(16),
                                          response_group=torch.tensor([0, 0, 0]), config=cfg, backend="torch")
    torch.testing.assert_close(loss, packed, rtol=1e-13, atol=1e-14)
    assert m_packed["aem/weights"].shape == (3,)


def test_empty_responses_and_ignored_labels():
    logits, labels, mask, rewards, groups, old, _ = _padded_batch(seed=5)
    mask[2] = False  # an empty response: no NaN, excluded from the group statistics and the seq-means
    labels = labels.clone()
    labels[0, mask[0].nonzero()[0, 0]] = -100  # an ignored label inside a response is not trained
    for mode in MODES + ["token-sum"]:
        loss, metrics = ak.aem_policy_loss(logits, labels, rewards, response_mask=mask, response_group=groups,
                                           old_logprobs=old, config=ak.AEMConfig(loss_agg_mode=mode),
                                           backend="torch")
        assert torch.isfinite(loss) and all(torch.isfinite(v).all() for v in metrics.values())
        assert metrics["aem/weights"][2] == 1
    effective = mask.clone()
    effective[labels == -100] = False
    expected, _ = ak.aem_policy_loss(logits, labels.clamp(min=0), rewards, response_mask=effective,
                                     response_group=groups, old_logprobs=old, backend="torch")
    got, _ = ak.aem_policy_loss(logits, labels, rewards, response_mask=mask, response_group=groups,
                                old_logprobs=old, backend="torch")
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=0)


def test_old_source_uses_old_values_and_needs_them():
    logits, labels, mask, rewards, groups, old, _ = _padded_batch(seed=6)
    old_entropy = torch.rand(6, 9, dtype=D)
    cfg = ak.AEMConfig(surprisal_source="old")
    _, metrics = ak.aem_policy_loss(logits, labels, rewards, response_mask=mask, response_group=groups,
                                    old_entropy=old_entropy, config=cfg, backend="torch")
    token_response = torch.where(mask, torch.arange(6)[:, None], -1)
    x = ak.response_entropy(old_entropy, token_response, 6)
    _, expected = ak.modulate_advantages(rewards, x, groups, cfg)
    torch.testing.assert_close(metrics["aem/weights"], expected["aem/weights"], rtol=1e-14, atol=0)
    cfg_s = ak.AEMConfig(surprisal_source="old", uncertainty="surprisal", surprisal_reduction="sum")
    _, metrics = ak.aem_policy_loss(logits, labels, rewards, response_mask=mask, response_group=groups,
                                    old_logprobs=old, config=cfg_s, backend="torch")
    x = ak.response_surprisal(old, token_response, 6, reduction="sum")
    _, expected = ak.modulate_advantages(rewards, x, groups, cfg_s)
    torch.testing.assert_close(metrics["aem/weights"], expected["aem/weights"], rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="old_entropy"):
        ak.aem_policy_loss(logits, labels, rewards, response_mask=mask, response_group=groups, config=cfg,
                           backend="torch")
    with pytest.raises(ValueError, match="old_logprobs"):
        ak.aem_policy_loss(logits, labels, rewards, response_mask=mask, response_group=groups,
                           config=cfg.replace(uncertainty="surprisal"), backend="torch")


def test_gradcheck_fp64_policy_loss():
    logits, labels, mask, rewards, groups, old, ref = _padded_batch(seed=7, rows=3, horizon=4, vocab=7)
    groups = torch.tensor([0, 0, 1])
    cfg = ak.AEMConfig(beta=0.8, entropy_coef=0.02, kl_coef=0.1, loss_agg_mode="seq-mean-token-mean")
    x = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda z: ak.aem_policy_loss(z, labels, rewards, response_mask=mask, response_group=groups,
                                     old_logprobs=old, ref_logprobs=ref, config=cfg, backend="torch")[0], (x,))


def test_aem_loss_module_and_bf16_logits():
    logits, labels, mask, rewards, groups, old, _ = _padded_batch(seed=8)
    module = ak.AEMLoss(ak.AEMConfig(beta=1.0))
    x = logits.to(torch.bfloat16).requires_grad_(True)
    loss, _ = module(x, labels, rewards, response_mask=mask, response_group=groups, old_logprobs=old.float())
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    ref_loss, _ = module(x.detach().double(), labels, rewards, response_mask=mask, response_group=groups,
                         old_logprobs=old)
    # bf16 inputs are exact in fp64; the fp32 computation differs from fp64 by fp32 rounding of O(1) terms.
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    assert "beta=1.0" in repr(module)


def _args(**changes):
    logits, labels, mask, rewards, groups, old, _ = _padded_batch(seed=9)
    args = dict(logits=logits, labels=labels, advantages=rewards, response_mask=mask, response_group=groups)
    args.update(changes)
    return args


@pytest.mark.parametrize("changes, error, match", [
    (dict(labels=torch.full((6, 9), 31)), ValueError, "labels"),
    (dict(labels=torch.zeros(6, 8, dtype=torch.long)), ValueError, "labels"),
    (dict(labels=torch.zeros(6, 9)), TypeError, "labels"),
    (dict(advantages=torch.tensor([1.0, float("nan"), 0, 0, 0, 0], dtype=D)), ValueError, "advantages"),
    (dict(advantages=torch.ones(5, dtype=D)), ValueError, "advantages"),
    (dict(response_group=torch.tensor([0, 0, 0, 1, 1, -2])), ValueError, "response_group"),
    (dict(response_group=torch.tensor([0, 0, 0, 1, 1])), ValueError, "response_group"),
    (dict(response_mask=torch.ones(6, 8, dtype=torch.bool)), ValueError, "response_mask"),
    (dict(response_mask=torch.full((6, 9), 0.5)), ValueError, "response_mask"),
    (dict(token_response=torch.zeros(54, dtype=torch.long)), ValueError, "exactly one"),
    (dict(response_mask=None), ValueError, "exactly one"),
    (dict(config=ak.AEMConfig(kl_coef=0.1)), ValueError, "ref_logprobs"),
    (dict(config="default"), TypeError, "config"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(advantage_level="sequence"), ValueError, "advantage_level"),
    (dict(old_logprobs=torch.zeros(6, 8, dtype=D)), ValueError, "old_logprobs"),
    (dict(ref_logprobs=torch.zeros(6, 9, dtype=torch.long), config=ak.AEMConfig(kl_coef=0.1)), TypeError,
     "ref_logprobs"),
    (dict(logits=torch.zeros(6, 9, 31, dtype=torch.long)), TypeError, "logits"),
    (dict(num_groups=1), ValueError, "response_group"),
])
def test_policy_loss_rejects_bad_input(changes, error, match):
    args = _args(**changes)
    with pytest.raises(error, match=match):
        ak.aem_policy_loss(args.pop("logits"), args.pop("labels"), args.pop("advantages"), **args)


def test_packed_ambiguous_advantage_level_and_token_response_range():
    logits = torch.randn(3, 5, dtype=D)
    labels = torch.tensor([1, 2, 3])
    kwargs = dict(token_response=torch.tensor([0, 1, 2]), response_group=torch.tensor([0, 0, 1]), backend="torch")
    with pytest.raises(ValueError, match="advantage_level"):
        ak.aem_policy_loss(logits, labels, torch.ones(3, dtype=D), **kwargs)
    as_tokens, _ = ak.aem_policy_loss(logits, labels, torch.ones(3, dtype=D), advantage_level="token", **kwargs)
    as_resp, _ = ak.aem_policy_loss(logits, labels, torch.ones(3, dtype=D), advantage_level="response", **kwargs)
    torch.testing.assert_close(as_tokens, as_resp, rtol=1e-14, atol=0)
    kwargs["token_response"] = torch.tensor([0, 3, -1])
    with pytest.raises(ValueError, match="token_response"):
        ak.aem_policy_loss(logits, labels, torch.ones(3, dtype=D), **kwargs)


@pytest.mark.parametrize("bad, error", [
    (torch.tensor([0, 1, -1]), ValueError),               # not [B, T]
    (torch.tensor([[0, -2, 1]]), ValueError),             # below -1
    (torch.tensor([[0.0, 1.0]]), TypeError),              # not integer
    ([[0, 1]], TypeError),                                # not a tensor
])
def test_turn_ids_to_token_response_rejects_bad_input(bad, error):
    with pytest.raises(error, match="turn_ids"):
        ak.turn_ids_to_token_response(bad)


def test_turn_ids_with_a_missing_turn_give_an_empty_response():
    token_response, turns = ak.turn_ids_to_token_response(torch.tensor([[0, -1, 2], [1, 1, -1]]))
    assert turns.tolist() == [3, 2]
    assert token_response.tolist() == [[0, -1, 2], [4, 4, -1]]  # responses 1 and 3 are empty
