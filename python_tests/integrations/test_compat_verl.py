"""Equivalence with the installed verl 0.9.1: `agg_loss` in every mode with its global normalisers, the actor
loss (`compute_policy_loss_vanilla` + `kl_penalty` + the entropy term, combined as verl's `ppo_loss` does) and
`verl.utils.torch_functional`'s token ops. Skips when verl is absent (`pip install .[verl]`).

Tolerances: fp64 comparisons are exact up to rounding (rtol 1e-12; the seq-mean modes differ from verl only in
the order of the same operations). fp32 comparisons follow the accuracy rule: our error against verl's own fp64
result is at most 3x the error of verl's fp32 run on the same input + 1e-5.
"""

import itertools

import pytest
import torch

verl_core = pytest.importorskip("verl.trainer.ppo.core_algos")
verl_F = pytest.importorskip("verl.utils.torch_functional")
verl_config = pytest.importorskip("verl.workers.config")

import aem_kernels as ak  # noqa: E402
from aem_kernels.loss import aggregate, aggregation_weights  # noqa: E402

D = torch.float64
MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
KL_NAMES = ["kl", "mse", "low_var_kl", "k1", "k2", "k3"]  # verl's names and ours


def _mask(rows, horizon, generator):
    """A padded response mask with a fully-masked row, a one-token row, a full row and random spans."""
    starts = torch.randint(0, 3, (rows,), generator=generator)
    lengths = torch.randint(1, horizon + 1, (rows,), generator=generator)
    pos = torch.arange(horizon)
    mask = (pos >= starts[:, None]) & (pos < (starts + lengths)[:, None])
    mask[0] = False
    mask[1] = False
    mask[1, horizon // 2] = True
    mask[2] = True
    return mask


def _normalisers(mask, case):
    """The global normalisers of one test case, as verl's trainer would pass them (None: verl's defaults)."""
    tokens, seqs = int(mask.sum()), int((mask.sum(-1) > 0).sum())
    if case == "local":
        return dict(dp_size=1)
    if case == "global":
        return dict(dp_size=1, batch_num_tokens=tokens + 5, global_batch_size=seqs + 3, loss_scale_factor=None)
    if case == "dp2":
        return dict(dp_size=2, batch_num_tokens=2 * tokens + 1, global_batch_size=2 * seqs)
    return dict(dp_size=4, batch_num_tokens=4 * tokens, global_batch_size=4 * seqs - 1, loss_scale_factor=13)


def _token_response(mask):
    return torch.where(mask, torch.arange(mask.shape[0])[:, None], -1)


@pytest.mark.parametrize("mode, case", list(itertools.product(MODES, ["local", "global", "dp2", "dp4"])))
def test_aggregation_equals_verl_agg_loss(mode, case):
    g = torch.Generator().manual_seed(MODES.index(mode))
    mask = _mask(7, 9, g)
    norms = _normalisers(mask, case)
    weights = aggregation_weights(_token_response(mask).reshape(-1), 7, mode, horizon=9, dtype=D, **norms)
    assert weights.dtype == D and bool((weights[~mask.reshape(-1)] == 0).all())
    for dtype in (D, torch.float32):
        loss_mat = (torch.randn(7, 9, generator=g, dtype=D) * 3).to(dtype)
        expected = verl_core.agg_loss(loss_mat, mask, mode, **norms)
        ours = aggregate(loss_mat.reshape(-1).to(D), weights)
        # fp64: the same sums in another order. fp32 input: verl sums in fp32 (recursive-summation bound
        # N u sum |c v| with u = 2^-24), we in fp64.
        terms = (weights * loss_mat.reshape(-1).to(D)).abs().sum()
        tol = 1e-12 * terms if dtype == D else mask.numel() * 2.0 ** -24 * terms * 2
        assert abs(float(ours) - float(expected)) <= float(tol) + 1e-300, (dtype, ours, expected)


def test_aggregation_normaliser_errors():
    tr = _token_response(_mask(4, 5, torch.Generator().manual_seed(0))).reshape(-1)
    with pytest.raises(ValueError, match="batch_num_tokens.*required.*dp_size > 1"):
        aggregation_weights(tr, 4, "token-mean", dp_size=2)
    with pytest.raises(ValueError, match="global_batch_size.*required.*dp_size > 1"):
        aggregation_weights(tr, 4, "seq-mean-token-mean", dp_size=2, batch_num_tokens=10)
    # verl needs nothing for token-sum, and ignores the normalisers a mode does not use
    torch.testing.assert_close(aggregation_weights(tr, 4, "token-sum", dp_size=3), (tr >= 0).float() * 3)
    aggregation_weights(tr, 4, "token-mean", dp_size=2, batch_num_tokens=10)
    for name, bad, error in [("dp_size", 0, ValueError), ("dp_size", 2.0, TypeError), ("dp_size", True, TypeError),
                             ("batch_num_tokens", 0, ValueError), ("global_batch_size", -3, ValueError),
                             ("loss_scale_factor", float("inf"), ValueError), ("loss_scale_factor", "8", TypeError),
                             ("batch_num_tokens", torch.tensor([1, 2]), ValueError)]:
        with pytest.raises(error, match=name):
            aggregation_weights(tr, 4, "seq-mean-token-sum-norm", **{name: bad})
    # a one-element tensor (verl's own counts before .item()) is accepted
    torch.testing.assert_close(aggregation_weights(tr, 4, "token-mean", batch_num_tokens=torch.tensor(8)),
                               aggregation_weights(tr, 4, "token-mean", batch_num_tokens=8))


def test_aem_policy_loss_normaliser_errors_come_before_any_work():
    logits = torch.randn(3, 4, 6)
    labels = torch.randint(0, 6, (3, 4))
    mask = torch.ones(3, 4, dtype=torch.bool)
    kwargs = dict(response_mask=mask, response_group=torch.zeros(3, dtype=torch.long), backend="torch")
    with pytest.raises(ValueError, match="global_batch_size"):
        ak.aem_policy_loss(logits, labels, torch.ones(3), config=ak.AEMConfig(loss_agg_mode="seq-mean-token-sum"),
                           dp_size=2, **kwargs)
    with pytest.raises(ValueError, match="loss_scale_factor"):
        ak.AEMLoss(ak.AEMConfig(), backend="torch")(logits, labels, torch.ones(3), loss_scale_factor=0,
                                                    response_mask=mask, response_group=torch.zeros(3, dtype=int))
    with pytest.raises(TypeError, match="dp_size"):
        ak.aem_policy_loss(logits, labels, torch.ones(3), dp_size="2", **kwargs)
    # the module passes the normalisers through: dp_size 2 over twice the tokens is the local token mean
    module = ak.AEMLoss(ak.AEMConfig(beta=0.0), backend="torch")
    args = (logits, labels, torch.randn(3))
    mask_kwargs = dict(response_mask=mask, response_group=torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(module(*args, dp_size=2, batch_num_tokens=24, **mask_kwargs)[0],
                               module(*args, **mask_kwargs)[0])
    torch.testing.assert_close(module(*args, batch_num_tokens=24, **mask_kwargs)[0],
                               module(*args, **mask_kwargs)[0] / 2)


# --- the actor loss ---------------------------------------------------------------------------------------

def _actor_config(cfg: ak.AEMConfig, kl_name: str, dual_clip: bool, norms: dict):
    """verl's own ActorConfig dataclass (what `get_policy_loss_fn("vanilla")` reads), normalisers included
    the way verl's `ppo_loss` sets them (`global_batch_info`)."""
    actor = verl_config.ActorConfig(
        strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=cfg.clip_low,
        clip_ratio_low=cfg.clip_low, clip_ratio_high=cfg.clip_high,
        clip_ratio_c=cfg.dual_clip if dual_clip else 1e9,  # verl always dual-clips; 1e9 never binds here
        loss_agg_mode=cfg.loss_agg_mode, entropy_coeff=cfg.entropy_coef, use_kl_loss=cfg.kl_coef > 0,
        kl_loss_coef=cfg.kl_coef, kl_loss_type=kl_name, loss_scale_factor=norms.get("loss_scale_factor"))
    actor.global_batch_info.update(dp_size=norms.get("dp_size", 1), batch_num_tokens=norms.get("batch_num_tokens"),
                                   global_batch_size=norms.get("global_batch_size"),
                                   loss_scale_factor=actor.loss_scale_factor)
    return actor


def verl_actor_loss(logits, labels, mask, advantages, old, ref, actor, temperature):
    """verl's actor: logits / temperature -> its log-probs and entropies -> its policy loss + entropy + KL terms,
    as `verl.workers.utils.losses.ppo_loss` combines them."""
    scaled = logits / temperature
    logprob = verl_F.logprobs_from_logits(scaled, labels)
    entropy = verl_F.entropy_from_logits(scaled)
    policy_loss_fn = verl_core.get_policy_loss_fn(actor.policy_loss.get("loss_mode", "vanilla"))
    pg_loss, metrics = policy_loss_fn(old_log_prob=old, log_prob=logprob, advantages=advantages,
                                      response_mask=mask, loss_agg_mode=actor.loss_agg_mode, config=actor)
    loss = pg_loss - actor.entropy_coeff * verl_core.agg_loss(entropy, mask, actor.loss_agg_mode,
                                                              **actor.global_batch_info)
    if actor.use_kl_loss:
        kld = verl_core.kl_penalty(logprob=logprob, ref_logprob=ref, kl_penalty=actor.kl_loss_type)
        loss = loss + actor.kl_loss_coef * verl_core.agg_loss(kld, mask, actor.loss_agg_mode,
                                                              **actor.global_batch_info)
    return loss, pg_loss, metrics


def _policy_batch(seed, rows=6, horizon=7, vocab=37):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, horizon, vocab, generator=g, dtype=D) * 2
    labels = torch.randint(0, vocab, (rows, horizon), generator=g)
    mask = _mask(rows, horizon, g)
    advantages = torch.randn(rows, horizon, generator=g, dtype=D) * mask
    true_lp = torch.log_softmax(logits / 0.7, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    # off-policy by up to +-1 nat so both clip sides and the dual clip (2.0 < e) bind on some tokens
    old = true_lp + (torch.rand(rows, horizon, generator=g, dtype=D) - 0.5) * 2
    # row 2 is full: one token each beyond the dual clip (A < 0, rho = e^1.5), above 1 + clip_high (A > 0,
    # rho = e^0.8) and below 1 - clip_low (A < 0, rho = e^-0.5), whatever the seed
    advantages[2, :3] = torch.tensor([-1.0, 1.0, -1.0], dtype=D)
    old[2, :3] = true_lp[2, :3] - torch.tensor([1.5, 0.8, -0.5], dtype=D)
    ref = true_lp + 0.3 * torch.randn(rows, horizon, generator=g, dtype=D)
    return logits, labels, mask, advantages, old, ref


def _verl_run(logits, labels, mask, adv, old, ref, actor, temperature, dtype):
    x = logits.detach().to(dtype).clone().requires_grad_(True)
    loss, pg_loss, metrics = verl_actor_loss(x, labels, mask, adv.to(dtype), old.to(dtype), ref.to(dtype), actor,
                                             temperature)
    loss.backward()
    return loss.detach().double(), x.grad.double(), pg_loss.detach().double(), metrics


BACKENDS = [("torch", None), ("cpu", None), ("triton", False), ("triton", True)]


@pytest.mark.parametrize("mode, dual_clip, backend", [
    (mode, dual, be) for mode in MODES for dual in (True, False) for be in BACKENDS])
def test_actor_loss_equals_verl(mode, dual_clip, backend):
    name, single_pass = backend
    seed = MODES.index(mode) * 2 + dual_clip
    logits, labels, mask, adv, old, ref = _policy_batch(seed)
    kl_name = KL_NAMES[seed % len(KL_NAMES)]
    norms = _normalisers(mask, ["local", "global", "dp2", "dp4"][seed % 4])
    cfg = ak.AEMConfig(beta=0.0, loss_agg_mode=mode, kl_type=kl_name, kl_coef=0.05, entropy_coef=0.01,
                       temperature=0.7, clip_low=0.15, clip_high=0.28, dual_clip=2.0 if dual_clip else None)
    actor = _actor_config(cfg, kl_name, dual_clip, norms)
    loss64, grad64, pg64, metrics64 = _verl_run(logits, labels, mask, adv, old, ref, actor, 0.7, D)
    loss32, grad32, pg32, metrics32 = _verl_run(logits, labels, mask, adv, old, ref, actor, 0.7, torch.float32)

    x = logits.float().requires_grad_(True)
    loss, metrics = ak.aem_policy_loss(x, labels, adv.float(), response_mask=mask, response_group=torch.zeros(
        6, dtype=torch.long), old_logprobs=old.float(), ref_logprobs=ref.float(), config=cfg, backend=name,
        single_pass=single_pass, **norms)
    loss.backward()

    def rule(ours, verl32, verl64):
        return (ours.double() - verl64).abs().max() <= 3 * (verl32 - verl64).abs().max() + 1e-5

    assert rule(loss.detach(), loss32, loss64), (float(loss), float(loss64))
    assert rule(x.grad, grad32, grad64), float((x.grad.double() - grad64).abs().max())
    assert rule(metrics["actor/pg_loss"], pg32, pg64)
    for key in ("actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/ppo_kl"):
        assert rule(metrics[key], torch.tensor(metrics32[key], dtype=D), torch.tensor(metrics64[key], dtype=D)), key
    if not dual_clip:
        assert metrics["actor/pg_clipfrac_lower"] == 0 and metrics64["actor/pg_clipfrac_lower"] == 0
    # the batch exercises what it claims to: clipping on both sides, and the dual clip when on
    assert 0 < metrics64["actor/pg_clipfrac"] < 1
    if dual_clip:
        assert metrics64["actor/pg_clipfrac_lower"] > 0


@pytest.mark.parametrize("mode", MODES)
def test_actor_loss_fp64_equals_verl_exactly(mode):
    logits, labels, mask, adv, old, ref = _policy_batch(11 + MODES.index(mode))
    norms = _normalisers(mask, "dp4")
    cfg = ak.AEMConfig(beta=0.0, loss_agg_mode=mode, kl_type="k3", kl_coef=0.05, entropy_coef=0.01,
                       temperature=0.7, clip_low=0.15, clip_high=0.28, dual_clip=3.0)
    loss64, grad64, _, metrics64 = _verl_run(logits, labels, mask, adv, old, ref,
                                             _actor_config(cfg, "low_var_kl", True, norms), 0.7, D)
    x = logits.clone().requires_grad_(True)
    loss, metrics = ak.aem_policy_loss(x, labels, adv, response_mask=mask, response_group=torch.zeros(
        6, dtype=torch.long), old_logprobs=old, ref_logprobs=ref, config=cfg, backend="torch", **norms)
    loss.backward()
    torch.testing.assert_close(loss.detach(), loss64, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(x.grad, grad64, rtol=1e-10, atol=1e-13)
    # verl's masked_mean divides by (count + 1e-8): relative 1e-8 / count; its clip fractions are fp32
    # (`.float()` of the indicators): 2 ulps of fp32
    torch.testing.assert_close(metrics["actor/ppo_kl"], torch.tensor(metrics64["actor/ppo_kl"], dtype=D),
                               rtol=1e-8, atol=1e-12)
    for key in ("actor/pg_clipfrac", "actor/pg_clipfrac_lower"):
        torch.testing.assert_close(metrics[key], torch.tensor(metrics64[key], dtype=D), rtol=2.0 ** -22, atol=0)


# --- micro-batches and data-parallel ranks add up to the whole batch -------------------------------------

# every mode in fp64 on the torch backend; the single-pass Triton kernel (interpreter: slow) on two modes
@pytest.mark.parametrize("mode, backend", [(mode, "torch") for mode in MODES] +
                         [("token-mean", "triton"), ("seq-mean-token-sum-norm", "triton")])
def test_micro_batches_and_ranks_add_up_to_the_whole_batch(mode, backend):
    """A shared linear head (what DDP/FSDP all-reduce) over 8 rows: 2 ranks x 2 micro-batches of 2 rows,
    each loss with verl's global normalisers; the micro-batch gradients summed per rank and averaged over
    the ranks equal the whole batch's gradient, and so do the losses; the whole batch equals verl's loss."""
    g = torch.Generator().manual_seed(40 + MODES.index(mode))
    rows, horizon, hidden, vocab, ranks, micro = 8, 6, 5, 23, 2, 2
    dtype = D if backend == "torch" else torch.float32
    states = torch.randn(rows, horizon, hidden, generator=g, dtype=D).to(dtype)
    head = (torch.randn(hidden, vocab, generator=g, dtype=D) * 0.7).to(dtype)
    labels = torch.randint(0, vocab, (rows, horizon), generator=g)
    mask = _mask(rows, horizon, g)
    mask[5] = False  # a second empty row, in another rank's micro-batch
    adv = (torch.randn(rows, generator=g, dtype=D)[:, None] * mask).to(dtype)
    with torch.no_grad():
        old = torch.log_softmax(states @ head, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        old = old + (torch.rand(rows, horizon, generator=g, dtype=D).to(dtype) - 0.5)
    cfg = ak.AEMConfig(beta=0.0, loss_agg_mode=mode, entropy_coef=0.02, clip_low=0.2, clip_high=0.3)
    groups = torch.arange(rows) // 4

    def loss_of(w, sl, **norms):
        return ak.aem_policy_loss(states[sl] @ w, labels[sl], adv[sl], response_mask=mask[sl],
                                  response_group=groups[sl], old_logprobs=old[sl], config=cfg, backend=backend,
                                  **norms)

    w_whole = head.clone().requires_grad_(True)
    whole, metrics_whole = loss_of(w_whole, slice(None))
    whole.backward()
    norms = dict(dp_size=ranks, batch_num_tokens=int(mask.sum()), global_batch_size=int((mask.sum(-1) > 0).sum()),
                 loss_scale_factor=horizon)
    rank_grads, rank_losses, rank_entropy = [], [], []
    per_rank = rows // ranks
    for rank in range(ranks):
        w = head.clone().requires_grad_(True)
        total, entropy = 0.0, 0.0
        for k in range(micro):
            start = rank * per_rank + k * (per_rank // micro)
            loss, metrics = loss_of(w, slice(start, start + per_rank // micro), **norms)
            loss.backward()  # gradient accumulation over micro-batches
            total, entropy = total + loss.detach(), entropy + metrics["actor/entropy"]
        rank_grads.append(w.grad)
        rank_losses.append(total)
        rank_entropy.append(entropy)
    mean = lambda values: torch.stack(values).mean(0)  # noqa: E731  (the DDP all-reduce of the gradients)
    # fp64: identical sums in another order; fp32: a few ulps of the whole batch's magnitudes
    tol = dict(rtol=1e-10, atol=1e-13) if dtype == D else dict(rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(mean(rank_losses), whole.detach(), **tol)
    torch.testing.assert_close(mean(rank_grads), w_whole.grad, **tol)
    torch.testing.assert_close(mean(rank_entropy), metrics_whole["actor/entropy"], **tol)
    assert float(w_whole.grad.abs().max()) > 1e-3  # the gradient is not trivially zero
    if dtype == D:
        logits = states @ head
        actor = _actor_config(cfg, "k3", True, {"dp_size": 1})
        expected = verl_actor_loss(logits, labels, mask, adv, old, None, actor, 1.0)[0]
        torch.testing.assert_close(whole.detach(), expected, rtol=1e-10, atol=1e-13)


# --- token ops --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, backend", list(itertools.product([torch.float32, torch.bfloat16],
                                                                   ["torch", "cpu", "triton"])))
def test_token_ops_equal_verl(dtype, backend):
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(3, 11, 301, generator=g, dtype=D) * 4).to(dtype)
    labels = torch.randint(0, 301, (3, 11), generator=g)
    exact = torch.log_softmax(logits.double(), -1)
    exact_lp = exact.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    exact_h = -(exact.exp() * exact).sum(-1)
    eager = torch.log_softmax(logits.float(), -1)  # eager fp32 torch: the accuracy rule's yardstick
    eager_lp_err = (eager.gather(-1, labels.unsqueeze(-1)).squeeze(-1).double() - exact_lp).abs().max()
    eager_h_err = (-(eager.exp() * eager).sum(-1).double() - exact_h).abs().max()
    theirs_lp = verl_F.logprobs_from_logits(logits, labels)
    theirs_h = verl_F.entropy_from_logits(logits)
    ours_lp = ak.logprobs_from_logits(logits, labels, backend=backend)
    ours_h = ak.entropy_from_logits(logits, backend=backend)
    assert ours_lp.dtype == ours_h.dtype == torch.float32  # verl returns the logits' dtype
    assert theirs_lp.dtype == dtype
    for ours, theirs, exact_v, eager_err in ((ours_lp, theirs_lp, exact_lp, eager_lp_err),
                                             (ours_h, theirs_h, exact_h, eager_h_err)):
        bound = 3 * eager_err + 1e-5
        assert (ours.double() - exact_v).abs().max() <= bound
        # agreement with verl to within verl's own rounding plus ours (bf16: verl rounds its outputs to bf16)
        assert bool(((ours.double() - theirs.double()).abs() <= (theirs.double() - exact_v).abs() + bound).all())
