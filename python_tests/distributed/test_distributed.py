"""torch.distributed: vocab-parallel log-probs/entropies and cross-rank AEM statistics against one process.

Every check of CHECKS runs in W gloo CPU processes per world size it names (2 and 4; the harness spawns them
once per world size, for every module's checks); each check compares the ranks' results with the single-process op on the
whole batch (each rank computes that itself from the same seeded data). The GPU smoke test runs NCCL with world
size 1.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.distributed as dist

import aem_kernels as ak
from aem_kernels.distributed import vocab_parallel_logprobs_and_entropy
from distributed_harness import Checks, Mismatches, assert_check_passed, slice_bounds, spawn

D = torch.float64
MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
WORLDS = (2, 4)
CHECKS = Checks(__name__)
check = CHECKS.register(worlds=WORLDS)
# the Triton interpreter is slow: its checks run at world size 2 only
check_triton = CHECKS.register(worlds=(2,))


# ---- the vocab-parallel op ------------------------------------------------------------------------------------

def _eager(logits, labels, temperature, dtype):
    """eq. 1-2 by eager torch in `dtype` (fp64: the exact reference); ignored rows give 0."""
    log_p = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)
    p = log_p.exp()
    entropy = -(p * torch.where(p > 0, log_p, torch.zeros((), dtype=dtype))).sum(-1)
    active = labels != -100
    lp = log_p.gather(-1, torch.where(active, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(active, lp, 0.0), torch.where(active, entropy, 0.0)


def _vp_inputs(kind, rows, vocab, generator):
    if kind == "huge":
        z = (torch.rand(rows, vocab, generator=generator, dtype=D) * 2 - 1) * 1e4
    elif kind == "peaked":
        z = torch.randn(rows, vocab, generator=generator, dtype=D)
        z[:, vocab // 3] += 60.0
    else:
        z = torch.randn(rows, vocab, generator=generator, dtype=D) * 3
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    labels[torch.rand(rows, generator=generator) < 0.2] = -100
    return z, labels


def _vp_case(m, rank, world, *, kind="normal", rows=19, vocab=37, temperature=1.0, dtype=torch.float32,
             backend="cpu", even=False, layout="2d", seed=0):
    g = torch.Generator().manual_seed(seed)
    z, labels = _vp_inputs("normal" if kind == "neg_inf" else kind, rows, vocab, g)
    bounds = slice_bounds(world, vocab, g, even)
    if kind == "neg_inf":
        z[torch.rand(rows, vocab, generator=g) < 0.3] = float("-inf")
        z[:, -1] = 0.5                                          # every row keeps a finite entry ...
        z[1, bounds[world - 2]:bounds[world - 1]] = float("-inf")  # ... but this rank's slice of row 1 is empty
        z[2, :] = float("-inf")                                 # row 2 is -inf everywhere: NaN outputs
        labels[3] = bounds[world - 1] - 1                       # a label on a -inf logit of an empty slice
        labels[4] = vocab - 1
    a = torch.randn(rows, generator=g, dtype=D)
    b = torch.randn(rows, generator=g, dtype=D)
    if layout == "3d":  # [B, T+1, V] logits used as the slice [:, :-1]
        z = z.view(1, rows, vocab)
        z = torch.cat([z, torch.randn(1, 1, vocab, generator=g, dtype=D)], dim=1)
        labels, a, b = labels.view(1, rows), a.view(1, rows), b.view(1, rows)
    full = z.to(dtype)
    cut = (lambda t: t[:, :-1]) if layout == "3d" else (lambda t: t)  # noqa: E731

    def loss(lp, h):
        # NaN rows (all -inf) keep their NaN; -inf log-probs would make the sum -inf, so weight them out
        lp = torch.where(torch.isinf(lp), 0.0, lp)
        return (lp.double() * a).nansum() + (h.double() * b).nansum()

    exact_leaf = full.detach().double().clone().requires_grad_()
    lp_x, h_x = _eager(cut(exact_leaf), labels, temperature, D)
    loss(lp_x, h_x).backward()
    eager_leaf = full.detach().float().clone().requires_grad_()
    lp_e, h_e = _eager(cut(eager_leaf), labels, temperature, torch.float32)
    loss(lp_e, h_e).backward()

    def bound(name, exact, eager):
        """The accuracy rule against fp64 of the full-vocab op: 3 x eager fp32's error + 1e-5, every backend."""
        ok = torch.isfinite(exact)
        err = (lambda t: (t.double() - exact)[ok].abs().max().item() if bool(ok.any()) else 0.0)  # noqa: E731
        rule = 3 * err(eager) + 1e-5
        if name == "grad":
            scale = exact[ok].abs().max().item() if bool(ok.any()) else 0.0
            # the gradient is stored in the logits' dtype: its own rounding adds half an ulp of that dtype
            rule += {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}.get(dtype, 0.0) * scale
        return rule

    lo, hi = bounds[rank], bounds[rank + 1]
    leaf = full.detach().clone().requires_grad_()
    shard = cut(leaf)[..., lo:hi]                       # a strided view: unit vocab stride only
    lp, h = vocab_parallel_logprobs_and_entropy(shard, labels, vocab_start=None if even else lo,
                                                temperature=temperature, backend=backend)
    loss(lp, h).backward()
    grad = cut(leaf.grad)[..., lo:hi]
    same = torch.stack([torch.nan_to_num(lp, 7.0, 8.0, 9.0), torch.nan_to_num(h, 7.0, 8.0, 9.0)])
    low, high = same.clone(), same.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)

    tag = f"{kind} V={vocab} T={temperature} {dtype} {backend} {layout} slices {bounds}"
    m.true(f"{tag}: outputs differ between ranks", torch.equal(low, high))
    m.true(f"{tag}: output dtype {lp.dtype}", lp.dtype == (D if dtype == D else torch.float32))
    for name, ours, exact, eager in (("logprobs", lp, lp_x, lp_e), ("entropy", h, h_x, h_e)):
        m.close(f"{tag} {name}", ours.detach(), exact.detach(), bound(name, exact.detach(), eager.detach()))
    exact_grad = cut(exact_leaf.grad)[..., lo:hi]
    m.close(f"{tag} grad", grad, exact_grad, bound("grad", exact_grad, cut(eager_leaf.grad)[..., lo:hi]))
    return grad


@check
def vocab_parallel_values_and_gradients(rank, world):
    m = Mismatches()
    cases = [dict(), dict(kind="huge", temperature=0.7), dict(kind="neg_inf", temperature=3.0, backend="torch"),
             dict(kind="peaked", temperature=0.3), dict(dtype=torch.bfloat16), dict(dtype=D, backend="torch"),
             dict(even=True, vocab=12 * world), dict(layout="3d", temperature=1.7), dict(kind="neg_inf", seed=3),
             dict(vocab=world + 1, rows=5), dict(kind="huge", layout="3d", backend="torch", even=True, vocab=40),
             dict(rows=0), dict(dtype=torch.float16, backend="torch", temperature=0.5)]
    for case in cases:
        _vp_case(m, rank, world, **case)
    m.raise_if_any()


@check
def vocab_parallel_partial_and_inplace_backward(rank, world):
    m = Mismatches()
    g = torch.Generator().manual_seed(5)
    vocab, rows = 29, 11
    z, labels = _vp_inputs("normal", rows, vocab, g)
    bounds = slice_bounds(world, vocab, g, even=False)
    lo, hi = bounds[rank], bounds[rank + 1]
    for use in ("logprobs", "entropy", "both"):
        exact = z.clone().requires_grad_()
        lp_x, h_x = _eager(exact, labels, 1.3, D)
        pick = (lambda lp, h: lp.sum() if use == "logprobs" else h.sum() if use == "entropy"  # noqa: E731
                else (lp * 2 - h).sum())
        pick(lp_x, h_x).backward()
        grads = []
        for inplace in (False, True):
            shard = z[:, lo:hi].clone().requires_grad_()
            lp, h = vocab_parallel_logprobs_and_entropy(shard, labels, vocab_start=lo, temperature=1.3,
                                                        backend="torch", inplace_backward=inplace)
            total = pick(lp, h)
            # users edit the outputs in place (masked_fill_): ordinary tensors, and the edit reaches no backward
            m.true(f"{use}: outputs are views", not lp._is_view() and not h._is_view())
            lp.masked_fill_(labels == -100, 5.0).mul_(2.0)
            h.fill_(-3.0)
            total.backward()
            grads.append(shard.grad)
            m.close(f"{use} inplace={inplace}", shard.grad, exact.grad[:, lo:hi], 1e-12)
        m.true(f"{use}: in-place gradient differs", torch.equal(grads[0], grads[1]))
    m.raise_if_any()


@check_triton
def triton_backend_paths(rank, world):
    """The vocab-parallel op and the single-pass loss kernel with a process group (small cases)."""
    m = Mismatches()
    _vp_case(m, rank, world, backend="triton", rows=6, vocab=21, temperature=0.8)
    pieces, whole = _loss_batch(world, vocab=9, seed=7)
    cfg = ak.AEMConfig(surprisal_source="old", loss_agg_mode="seq-mean-token-mean")
    _compare_loss(m, "single-pass", rank, world, pieces, whole, cfg, backend="triton", dtype=torch.float32,
                  tol=2e-5, single_pass=True)
    m.raise_if_any()


@check
def vocab_parallel_bad_input(rank, world):
    m = Mismatches()
    vocab_local, rows = 5, 4
    shard = torch.randn(rows, vocab_local)
    labels = torch.randint(0, vocab_local * world, (rows,))
    op = vocab_parallel_logprobs_and_entropy
    m.raises("overlapping slices", ValueError, "tile", lambda: op(shard, labels, vocab_start=0))
    m.raises("gap", ValueError, "tile", lambda: op(shard, labels, vocab_start=rank * (vocab_local + 1)))
    uneven = torch.randn(rows, vocab_local + rank)
    m.raises("uneven widths, default start", ValueError, "vocab_start", lambda: op(uneven, labels))
    m.raises("label >= V", ValueError, "labels", lambda: op(shard, torch.full((rows,), vocab_local * world)))
    m.raises("negative label", ValueError, "labels", lambda: op(shard, torch.full((rows,), -3)))
    m.raises("rows differ", ValueError, "same tokens",
             lambda: op(torch.randn(rows + rank, vocab_local), torch.zeros(rows + rank, dtype=torch.long)))
    m.raises("vocab_start < 0", ValueError, "vocab_start", lambda: op(shard, labels, vocab_start=-1))
    m.raises("group type", TypeError, "ProcessGroup", lambda: op(shard, labels, group="tp"))
    m.raises("float labels", TypeError, "labels", lambda: op(shard, labels.float()))
    m.raises("labels shape", ValueError, "labels", lambda: op(shard, labels[:-1]))
    m.raises("integer logits", TypeError, "logits_shard", lambda: op(shard.long(), labels))
    m.raises("temperature", ValueError, "temperature", lambda: op(shard, labels, temperature=0.0))
    # inside skip_value_checks the default start is used unchecked; every rank drew the same shard here
    with ak.skip_value_checks():
        lp, h = op(shard, labels)
    ref_lp, ref_h = _eager(shard.repeat(1, world), labels, 1.0, D)
    m.close("skip_value_checks: logprobs", lp, ref_lp, 1e-5)
    m.close("skip_value_checks: entropy", h, ref_h, 1e-5)
    m.raise_if_any()


# ---- cross-rank AEM statistics ----------------------------------------------------------------------------------

def _response_specs(world):
    """(group, rank, trained tokens) of every response of the global batch, in global response order."""
    specs = [(0, r, 2 + r) for r in range(world) if r != 1]   # group 0 on every rank but rank 1
    if world == 2:
        specs.append((0, 1, 0))                                # world 2: rank 1 holds one empty response
    specs += [(1, 0, 3), (1, 0, 4), (1, 0, 1)]                 # group 1 entirely on rank 0
    specs += [(2, 0, 2), (2, world - 1, 5)]                    # group 2 on two ranks
    specs += [(3, world - 1, 3), (3, world - 1, 0)]            # group 3 on the last rank, one response empty
    if world > 2:
        specs += [(5, 2, 2), (5, 3, 2), (5, 2, 1)]             # group 5 on ranks 2 and 3; group 4 never occurs
    return sorted(specs, key=lambda s: s[1])                   # rank-major: the whole batch is the concatenation


def _loss_batch(world, vocab=13, seed=0):
    """Per-rank packed inputs and the whole batch (their concatenation). Rank 1 has no trained token."""
    g = torch.Generator().manual_seed(seed)
    specs = _response_specs(world)
    pieces = []
    for rank in range(world):
        mine = [s for s in specs if s[1] == rank]
        token_response, labels_ok = [-1, -1], [True, True]        # two prompt tokens
        for local, (_, _, length) in enumerate(mine):
            token_response += [local] * (length + 1)
            labels_ok += [True] * length + [False]                # one ignored label in every response
        n = len(token_response)
        labels = torch.randint(0, vocab, (n,), generator=g)
        labels[~torch.tensor(labels_ok)] = -100
        logits = torch.randn(n, vocab, generator=g, dtype=D) * 2
        true_lp, true_h = _eager(logits, torch.where(labels >= 0, labels, 0), 1.0, D)
        pieces.append(dict(
            logits=logits, labels=labels, token_response=torch.tensor(token_response),
            response_group=torch.tensor([s[0] for s in mine], dtype=torch.long),
            advantages=torch.randn(len(mine), generator=g, dtype=D),
            token_advantages=torch.randn(n, generator=g, dtype=D),
            old_logprobs=true_lp + (torch.rand(n, generator=g, dtype=D) - 0.5),
            ref_logprobs=true_lp + 0.3 * torch.randn(n, generator=g, dtype=D),
            old_entropy=true_h + 0.1 * torch.rand(n, generator=g, dtype=D)))
    whole = {}
    offset = 0
    for piece in pieces:
        shifted = torch.where(piece["token_response"] >= 0, piece["token_response"] + offset, -1)
        offset += piece["response_group"].shape[0]
        for key, value in piece.items():
            value = shifted if key == "token_response" else value
            whole[key] = torch.cat([whole[key], value]) if key in whole else value
    return pieces, whole


def _response_slice(pieces, rank):
    start = sum(p["response_group"].shape[0] for p in pieces[:rank])
    return slice(start, start + pieces[rank]["response_group"].shape[0])


def _token_slice(pieces, rank):
    start = sum(p["labels"].shape[0] for p in pieces[:rank])
    return slice(start, start + pieces[rank]["labels"].shape[0])


def _run_loss(batch, config, *, token_level, backend="torch", group=None, dtype=D, **kwargs):
    leaf = batch["logits"].to(dtype).clone().requires_grad_()
    bias = torch.zeros(batch["logits"].shape[-1], dtype=dtype, requires_grad=True)  # a parameter every rank shares
    advantages = batch["token_advantages"] if token_level else batch["advantages"]
    loss, metrics = ak.aem_policy_loss(
        leaf + bias, batch["labels"], advantages, token_response=batch["token_response"],
        response_group=batch["response_group"], old_logprobs=batch["old_logprobs"],
        old_entropy=batch["old_entropy"], ref_logprobs=batch["ref_logprobs"], config=config, backend=backend,
        advantage_level="token" if token_level else "response", process_group=group, **kwargs)
    loss.backward()
    return loss.detach(), metrics, leaf.grad, bias.grad


def _compare_loss(m, tag, rank, world, pieces, whole, config, *, token_level=False, backend="torch", dtype=D,
                  tol=1e-10, **kwargs):
    loss, metrics, grad, bias_grad = _run_loss(pieces[rank], config, token_level=token_level, backend=backend,
                                               group=dist.group.WORLD, dtype=dtype, **kwargs)
    ref_loss, ref_metrics, ref_grad, ref_bias = _run_loss(whole, config, token_level=token_level, backend=backend,
                                                          dtype=dtype)
    # what DDP/FSDP do: average the ranks' gradients of a shared parameter (and of the loss, for the check)
    averaged = torch.cat([loss.double().reshape(1), bias_grad.double()])
    dist.all_reduce(averaged)
    averaged /= world
    m.close(f"{tag}: mean of the ranks' losses", averaged[0], ref_loss, tol, tol)
    m.close(f"{tag}: averaged shared-parameter gradient", averaged[1:], ref_bias, tol, tol)
    m.close(f"{tag}: token gradients / world", grad.double() / world, ref_grad[_token_slice(pieces, rank)], tol, tol)
    m.true(f"{tag}: metric keys {sorted(metrics)} != {sorted(ref_metrics)}", sorted(metrics) == sorted(ref_metrics))
    for key, value in ref_metrics.items():
        if key == "aem/weights":
            m.close(f"{tag}: {key}", metrics[key], value[_response_slice(pieces, rank)], tol, tol)
        elif key in metrics:
            m.close(f"{tag}: {key}", metrics[key], value, tol, tol)


CONFIGS = [
    ak.AEMConfig(),
    ak.AEMConfig(baseline="mean", zscore=True, normalize="batch", beta=0.7),
    ak.AEMConfig(baseline="loo", phi="linear", beta=0.5, w_max=1.2),
    ak.AEMConfig(baseline="batch", zscore=True, normalize="none", sign=-1, beta=2.0),
    ak.AEMConfig(uncertainty="surprisal", surprisal_reduction="sum", surprisal_source="old", entropy_coef=0.01,
                 kl_coef=0.1, kl_type="k2", w_min=0.5),
]


@check
def loss_whole_batch_equality(rank, world):
    m = Mismatches()
    pieces, whole = _loss_batch(world)
    for j, mode in enumerate(MODES):
        for i in (j, (j + 2) % len(CONFIGS)):  # every mode twice, every config twice
            cfg = dataclasses.replace(CONFIGS[i], loss_agg_mode=mode)
            _compare_loss(m, f"{mode} config {i}", rank, world, pieces, whole, cfg)
        _compare_loss(m, f"{mode} token advantages", rank, world, pieces, whole,
                      ak.AEMConfig(loss_agg_mode=mode, kl_coef=0.05), token_level=True)
    _compare_loss(m, "num_groups given", rank, world, pieces, whole, CONFIGS[1], num_groups=9)
    _compare_loss(m, "cpu backend fp32", rank, world, pieces, whole, CONFIGS[0], backend="cpu",
                  dtype=torch.float32, tol=2e-5)
    m.raise_if_any()


@check
def fused_linear_loss_single_pass(rank, world):
    """The fused-linear loss's single pass (weights known before the forward: surprisal_source="old") with a
    process group: the ranks' losses and shared-weight gradients average to the whole batch's two-pass ones,
    the hidden states' gradients are the whole batch's rows times the world size, the metrics are global."""
    m = Mismatches()
    pieces, whole = _loss_batch(world, vocab=17, seed=5)
    g = torch.Generator().manual_seed(9)
    weight0 = torch.randn(17, 6, generator=g, dtype=D)
    hidden = [torch.randn(p["labels"].shape[0], 6, generator=g, dtype=D) for p in pieces]

    def run(batch, states, group, single_pass, config):
        h, w = states.clone().requires_grad_(), weight0.clone().requires_grad_()
        loss, metrics = ak.fused_linear_aem_policy_loss(
            h, w, batch["labels"], batch["advantages"], token_response=batch["token_response"],
            response_group=batch["response_group"], old_logprobs=batch["old_logprobs"],
            old_entropy=batch["old_entropy"], ref_logprobs=batch["ref_logprobs"], config=config, backend="torch",
            process_group=group, single_pass=single_pass)
        loss.backward()
        return loss.detach(), metrics, h.grad, w.grad, type(loss.grad_fn).__name__

    for mode in MODES:
        cfg = ak.AEMConfig(surprisal_source="old", beta=1.0, entropy_coef=0.01, kl_coef=0.1, loss_agg_mode=mode)
        loss, metrics, grad_h, grad_w, fn = run(pieces[rank], hidden[rank], dist.group.WORLD, True, cfg)
        ref_loss, ref_metrics, ref_h, ref_w, _ = run(whole, torch.cat(hidden), None, False, cfg)
        m.true(f"{mode}: single pass not taken ({fn})", fn == "FusedLinearLossGradientFunctionBackward")
        averaged = torch.cat([loss.reshape(1), grad_w.reshape(-1)])
        dist.all_reduce(averaged)
        averaged /= world
        m.close(f"{mode}: mean loss", averaged[0], ref_loss, 1e-10, 1e-10)
        m.close(f"{mode}: averaged weight gradient", averaged[1:], ref_w.reshape(-1), 1e-10, 1e-10)
        m.close(f"{mode}: hidden gradient / world", grad_h / world, ref_h[_token_slice(pieces, rank)], 1e-10, 1e-10)
        for key in ("actor/pg_loss", "actor/entropy", "actor/kl_loss", "aem/w_std", "actor/pg_clipfrac"):
            m.close(f"{mode}: {key}", metrics[key], ref_metrics[key], 1e-10, 1e-10)
    m.raise_if_any()


@check
def loss_padded_form(rank, world):
    m = Mismatches()
    g = torch.Generator().manual_seed(11)
    horizon, vocab = 6, 11
    rows = [2 + r % 2 for r in range(world)]
    per_rank = []
    for r in range(world):
        logits = torch.randn(rows[r], horizon, vocab, generator=g, dtype=D)
        mask = torch.rand(rows[r], horizon, generator=g) < 0.7
        if r == 1:
            mask[0] = False                                     # an empty row
        per_rank.append(dict(logits=logits, labels=torch.randint(0, vocab, (rows[r], horizon), generator=g),
                             response_mask=mask, response_group=torch.randint(0, 3, (rows[r],), generator=g),
                             advantages=torch.randn(rows[r], generator=g, dtype=D)))
    whole = {k: torch.cat([p[k] for p in per_rank]) for k in per_rank[0]}
    for mode in MODES:
        cfg = ak.AEMConfig(loss_agg_mode=mode, baseline="mean")
        outs = []
        for batch, group in ((per_rank[rank], dist.group.WORLD), (whole, None)):
            leaf = batch["logits"].clone().requires_grad_()
            loss, metrics = ak.aem_policy_loss(leaf, batch["labels"], batch["advantages"],
                                               response_mask=batch["response_mask"],
                                               response_group=batch["response_group"], config=cfg, backend="torch",
                                               process_group=group)
            loss.backward()
            outs.append((loss.detach(), metrics, leaf.grad))
        (loss, metrics, grad), (ref_loss, ref_metrics, ref_grad) = outs
        total = loss.clone().reshape(1)
        dist.all_reduce(total)
        start = sum(rows[:rank])
        m.close(f"{mode}: mean loss", total[0] / world, ref_loss, 1e-10, 1e-10)
        m.close(f"{mode}: grad", grad / world, ref_grad[start:start + rows[rank]], 1e-10, 1e-10)
        for key in ("actor/pg_loss", "actor/entropy", "aem/w_std", "aem/drift", "actor/pg_clipfrac"):
            m.close(f"{mode}: {key}", metrics[key], ref_metrics[key], 1e-10, 1e-10)
    m.raise_if_any()


@check
def loss_rank_local_statistics(rank, world):
    """process_group=None keeps AEM's statistics on the rank; verl's normalisers passed by hand still make the
    averaged gradient the whole batch's (here with beta = 0, where the statistics do not move the loss)."""
    m = Mismatches()
    pieces, whole = _loss_batch(world, seed=4)
    mine = pieces[rank]
    counts = torch.tensor([float(((mine["token_response"] >= 0) & (mine["labels"] != -100)).sum())])
    dist.all_reduce(counts)
    cfg = ak.AEMConfig(beta=0.0)
    loss, metrics, grad, bias_grad = _run_loss(mine, cfg, token_level=False, dp_size=world,
                                               batch_num_tokens=float(counts[0]))
    ref_loss, _, ref_grad, ref_bias = _run_loss(whole, cfg, token_level=False)
    averaged = bias_grad.clone()
    dist.all_reduce(averaged)
    m.close("averaged gradient", averaged / world, ref_bias, 1e-10, 1e-10)
    m.close("token gradients", grad / world, ref_grad[_token_slice(pieces, rank)], 1e-10, 1e-10)
    _, local_metrics, _, _ = _run_loss(mine, ak.AEMConfig(beta=0.0), token_level=False)
    m.close("rank-local x_mean", metrics["aem/x_mean"], local_metrics["aem/x_mean"], 1e-12)
    m.raise_if_any()


@check
def modulation_whole_batch_equality(rank, world):
    m = Mismatches()
    g = torch.Generator().manual_seed(2)
    sizes = [0 if (world > 2 and r == 1) else 3 + r for r in range(world)]  # world 4: rank 1 holds no response
    total = sum(sizes)
    x = torch.rand(total, generator=g, dtype=D)
    groups = torch.randint(0, 4, (total,), generator=g)
    groups[-1] = 5                                  # a group of one response; group 4 never occurs
    tie = groups == 2
    x[tie] = 0.25                                   # an all-equal group: spread 0
    advantages = torch.randn(total, generator=g, dtype=D)
    valid = torch.rand(total, generator=g) > 0.2
    start = sum(sizes[:rank])
    mine = slice(start, start + sizes[rank])
    # every baseline with and without zscore; the normalisations and phis cycle over them (and all on minmax)
    combos = [(b, z) for b in ("minmax", "mean", "loo", "batch") for z in (False, True) if (b, z) != ("minmax", True)]
    combos = [(b, z, ("group", "batch", "none")[i % 3], ("exp", "linear")[i % 2]) for i, (b, z) in enumerate(combos)]
    combos += [("minmax", False, "batch", "exp"), ("minmax", False, "none", "linear")]
    for baseline, zscore, normalize, phi in combos:
        cfg = ak.AEMConfig(baseline=baseline, zscore=zscore, normalize=normalize, phi=phi, beta=0.8, w_max=1.5)
        tag = f"{baseline} zscore={zscore} {normalize} {phi}"
        out, metrics = ak.modulate_advantages(advantages[mine], x[mine], groups[mine], cfg,
                                              response_valid=valid[mine], process_group=dist.group.WORLD)
        ref, ref_metrics = ak.modulate_advantages(advantages, x, groups, cfg, response_valid=valid)
        m.close(tag, out, ref[mine], 1e-12, 1e-12)
        for key, value in ref_metrics.items():
            want = value[mine] if key == "aem/weights" else value
            m.close(f"{tag}: {key}", metrics[key], want, 1e-12, 1e-12)
    cfg = ak.AEMConfig(baseline="mean", zscore=True)
    u = ak.relative_uncertainty(x[mine], groups[mine], 6, baseline="loo", zscore=True, valid=valid[mine],
                                process_group=dist.group.WORLD)
    m.close("relative_uncertainty", u, ak.relative_uncertainty(x, groups, 6, baseline="loo", zscore=True,
                                                               valid=valid)[mine], 1e-12, 1e-12)
    w, _, _ = ak.aem_weights(x[mine], groups[mine], cfg, num_groups=6, valid=valid[mine],
                             process_group=dist.group.WORLD)
    m.close("aem_weights", w, ak.aem_weights(x, groups, cfg, num_groups=6, valid=valid)[0][mine], 1e-12, 1e-12)
    m.raises("process_group type", TypeError, "ProcessGroup",
             lambda: ak.modulate_advantages(advantages[mine], x[mine], groups[mine], cfg, process_group="dp"))
    m.raises("loss process_group type", TypeError, "ProcessGroup",
             lambda: ak.aem_policy_loss(torch.randn(3, 5), torch.zeros(3, dtype=torch.long), torch.zeros(1),
                                        token_response=torch.zeros(3, dtype=torch.long),
                                        response_group=torch.zeros(1, dtype=torch.long), process_group=1))
    m.raise_if_any()


# ---- the runs --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("world, name", CHECKS.cases(WORLDS))
def test_distributed(world, name, tmp_path_factory):
    assert_check_passed(CHECKS, world, name, tmp_path_factory)


def test_needs_an_initialised_process_group():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="not initialised"):
        vocab_parallel_logprobs_and_entropy(torch.randn(2, 3), torch.zeros(2, dtype=torch.long))
    # a process_group of the wrong type is named as such, initialised or not
    with pytest.raises(TypeError, match="process_group must be a torch.distributed ProcessGroup"):
        ak.modulate_advantages(torch.zeros(2, dtype=D), torch.zeros(2, dtype=D), torch.zeros(2, dtype=torch.long),
                               process_group=object())
    with pytest.raises(TypeError, match="group must be a torch.distributed ProcessGroup"):
        vocab_parallel_logprobs_and_entropy(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), group="tp")


def _nccl_worker(rank, world, store_path):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{store_path}", rank=rank, world_size=world)
    failures = []
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(64, 1000, generator=g) * 3).cuda()
    labels = torch.randint(0, 1000, (64,), generator=g).cuda()
    labels[:5] = -100
    leaf = logits.clone().requires_grad_()
    lp, h = vocab_parallel_logprobs_and_entropy(leaf, labels, temperature=0.9)
    (lp.sum() - h.sum()).backward()
    ref_leaf = logits.clone().requires_grad_()
    ref_lp, ref_h = ak.logprobs_and_entropy(ref_leaf, labels, temperature=0.9)
    (ref_lp.sum() - ref_h.sum()).backward()
    for name, got, want in (("logprobs", lp, ref_lp), ("entropy", h, ref_h), ("grad", leaf.grad, ref_leaf.grad)):
        err = (got - want).abs().max().item()
        if not err <= 1e-4:
            failures.append(f"{name}: {err}")
    adv = torch.randn(8, generator=g).cuda()
    tr = torch.repeat_interleave(torch.arange(8), 8).cuda()
    rg = torch.arange(8).cuda() // 4
    loss, metrics = ak.aem_policy_loss(logits, labels, adv, token_response=tr, response_group=rg,
                                       process_group=dist.group.WORLD)
    ref_loss, _ = ak.aem_policy_loss(logits, labels, adv, token_response=tr, response_group=rg)
    if not math.isclose(loss.item(), ref_loss.item(), rel_tol=1e-5, abs_tol=1e-6):
        failures.append(f"loss {loss.item()} != {ref_loss.item()}")
    dist.destroy_process_group()
    return {"nccl": "\n".join(failures) or None}


@pytest.mark.gpu
def test_nccl_smoke_world_size_one(tmp_path):
    if not dist.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    (result,) = spawn(_nccl_worker, 1, tmp_path)
    assert result["nccl"] is None, result["nccl"]


@pytest.mark.parametrize("mode", MODES)
def test_loss_of_a_batch_without_responses(mode):
    """A data-parallel rank may hold tokens but no response: the loss is 0 with a zero gradient (no index error)."""
    logits = torch.randn(5, 7, dtype=D, requires_grad=True)
    loss, metrics = ak.aem_policy_loss(logits, torch.zeros(5, dtype=torch.long), torch.zeros(0, dtype=D),
                                       token_response=torch.full((5,), -1),
                                       response_group=torch.zeros(0, dtype=torch.long),
                                       config=ak.AEMConfig(loss_agg_mode=mode), backend="torch")
    loss.backward()
    assert loss.item() == 0.0 and metrics["aem/weights"].shape == (0,)
    assert torch.equal(logits.grad, torch.zeros_like(logits))
