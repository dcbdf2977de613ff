"""aem_kernels.distributed.vocab_parallel_fused_linear_logprobs_and_entropy: a vocab-sharded lm_head weight.

Every check of CHECKS runs at the world sizes it names: in W gloo CPU processes (2 and 4; the harness spawns
them once per world size, for every module's checks) and in this process with a world of one (group=None). Each rank
compares its outputs and gradients with one process's `ak.fused_linear_logprobs_and_entropy` on the whole weight
and with fp64 of the materialised logits under the accuracy rule (both computed by every rank from the same
seeded data).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import aem_kernels as ak
from helpers import REPO_ROOT
from aem_kernels import distributed
from aem_kernels.distributed import vocab_parallel_fused_linear_logprobs_and_entropy as vp_linear
from distributed_harness import Checks, Mismatches, assert_check_passed, slice_bounds
from fused_linear_checks import grads, materialised

D = torch.float64
WORLDS = (2, 4)
CHECKS = Checks(__name__)
check = CHECKS.register(worlds=(1,) + WORLDS)


def _data(world, *, rows, hidden, vocab, scale, bias, kind, even, seed):
    """fp64 hidden [rows, H], weight [V, H], bias [V] | None, labels [rows], the slice bounds and upstream (a, b).
    Labels sit on finite logits; rows 0 .. world-1 hold a label of each rank's slice (where it has a finite one)."""
    g = torch.Generator().manual_seed(seed)
    bounds = slice_bounds(world, vocab, g, even)
    x = torch.randn(rows, hidden, generator=g, dtype=D) * scale
    w = torch.randn(vocab, hidden, generator=g, dtype=D) / hidden ** 0.5 * 3
    b = torch.randn(vocab, generator=g, dtype=D) if bias or kind in ("neg_inf", "empty_slice") else None
    if kind == "neg_inf":                      # -inf bias entries in every slice, each slice keeps a finite one
        b[torch.rand(vocab, generator=g) < 0.4] = -math.inf
        b[torch.tensor(bounds[:-1])] = 0.5
    elif kind == "empty_slice":                # the last rank's slice is -inf on every row: w_k = 0 there
        b[bounds[world - 1]:] = -math.inf
    finite = torch.isfinite(b) if b is not None else torch.ones(vocab, dtype=torch.bool)
    labels = torch.multinomial(finite.double().expand(max(rows, 1), vocab), 1, generator=g).view(-1)[:rows]
    ignored = torch.rand(rows, generator=g) < 0.25
    for r in range(min(world, rows)):
        owned = finite[bounds[r]:bounds[r + 1]].nonzero()
        ignored[r] = False
        if len(owned):
            labels[r] = bounds[r] + int(owned[-1])
    labels[ignored] = -100
    if kind == "all_ignored":
        labels[:] = -100
    a = torch.randn(rows, generator=g, dtype=D)
    b_up = torch.randn(rows, generator=g, dtype=D)
    return x, w, b, labels, bounds, a, b_up


def _rule(eager, truth):
    """The accuracy rule's bound: 3 x eager fp32's max abs error against fp64 + 1e-5."""
    err = (eager.double() - truth.double()).abs()
    return 3 * (err.max().item() if err.numel() else 0.0) + 1e-5


def _case(m, rank, world, *, rows=37, hidden=29, vocab=301, dtype=torch.float32, scale=1.0, temperature=1.0,
          bias=True, kind="normal", even=False, layout="2d", backend="cpu", budget=None, seed=0):
    x, w, b, labels, bounds, ga, gb = _data(world, rows=rows, hidden=hidden, vocab=vocab, scale=scale, bias=bias,
                                            kind=kind, even=even, seed=seed)
    lo, hi = bounds[rank], bounds[rank + 1]
    x, w = x.to(dtype), w.to(dtype)
    b = b.to(dtype) if b is not None else None
    if layout == "3d":  # [B, T+1, H] hidden states used as the slice [:, :-1]
        x = torch.cat([x.view(1, rows, hidden), torch.full((1, 1, hidden), 0.5, dtype=dtype)], dim=1)
        labels, ga, gb = labels.view(1, rows), ga.view(1, rows), gb.view(1, rows)
    cut = (lambda t: t[:, :-1]) if layout == "3d" else (lambda t: t)  # noqa: E731

    # ours: this rank's rows of the weight and bias
    leaves = [x.clone().requires_grad_(), w[lo:hi].clone().requires_grad_()]
    leaves += [b[lo:hi].clone().requires_grad_()] if b is not None else []
    lp, h = vp_linear(cut(leaves[0]), leaves[1], labels, bias_shard=leaves[2] if b is not None else None,
                      vocab_start=None if even else lo, temperature=temperature, backend=backend,
                      chunk_budget_bytes=budget)
    ours = grads((lp, h), leaves, ga, gb)
    # one process on the whole weight, the fp64 truth and eager fp32 of the materialised logits
    ref_leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    ref_out = ak.fused_linear_logprobs_and_entropy(cut(ref_leaves[0]), ref_leaves[1], labels,
                                                   bias=ref_leaves[2] if b is not None else None,
                                                   temperature=temperature, backend=backend,
                                                   chunk_budget_bytes=budget)
    ref = grads(ref_out, ref_leaves, ga, gb)
    truth, eager = (materialised(cut(x), w, b, labels, temperature, t) for t in (D, torch.float32))
    truth_g, eager_g = grads(truth[:2], truth[2], ga, gb), grads(eager[:2], eager[2], ga, gb)

    tag = f"{kind} rows={rows} V={vocab} {dtype} T={temperature} x{scale} {backend} {layout} budget={budget} {bounds}"
    out_dtype = D if dtype == D else torch.float32
    m.true(f"{tag}: output dtype/shape", lp.dtype == h.dtype == out_dtype and lp.shape == labels.shape)
    for name, got, want, tru, eag in (("logprobs", lp, ref_out[0], truth[0], eager[0]),
                                      ("entropy", h, ref_out[1], truth[1], eager[1])):
        bound = _rule(eag, tru)
        m.close(f"{tag} {name} vs fp64", got.detach(), tru.detach(), bound)
        m.close(f"{tag} {name} vs the single-process op", got.detach(), want.detach(), bound)
    # gradients: hidden (the full one on every rank), this slice of the weight and of the bias
    # (ours holds the slice's rows already; the materialised references' hidden leaf is the hidden slice)
    rows_of = (lambda t, i, hidden_cut=True: t[lo:hi] if i > 0 else cut(t) if hidden_cut else t)  # noqa: E731
    for i, name in enumerate(("hidden", "weight_shard", "bias_shard")[:len(ours)]):
        got = cut(ours[i]) if i == 0 else ours[i]
        want, tru = rows_of(ref[i], i), rows_of(truth_g[i], i, False)
        eag = rows_of(eager_g[i], i, False).to(leaves[i].dtype)  # eager's gradient rounded to the leaf's dtype
        m.true(f"{tag} grad {name} dtype/shape", ours[i].dtype == leaves[i].dtype
               and ours[i].shape == leaves[i].shape)
        bound = _rule(eag, tru)
        m.close(f"{tag} grad {name} vs fp64", got, tru, bound)
        m.close(f"{tag} grad {name} vs the single-process op", got, want, bound)
    if layout == "3d":
        m.true(f"{tag}: gradient outside the hidden slice", not bool(ours[0][:, -1].any()))
    # every rank returns the same outputs and the same (all-reduced) hidden gradient
    same = torch.cat([lp.detach().reshape(-1).double(), h.detach().reshape(-1).double(),
                      ours[0].reshape(-1).double()])
    low, high = same.clone(), same.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    m.true(f"{tag}: outputs or grad_hidden differ between ranks", torch.equal(low, high))
    return lp, h, ours, ref_out, ref


@check
def fused_linear_values_and_gradients(rank, world):
    m = Mismatches()
    cases = [dict(), dict(bias=False, temperature=2.5, layout="3d"), dict(dtype=torch.bfloat16, budget=4 * 301 * 6),
             dict(dtype=torch.float16, backend="torch", temperature=0.5), dict(scale=3000.0, temperature=0.3),
             dict(scale=30.0, temperature=3.0, backend="torch", budget=1), dict(kind="neg_inf", temperature=0.7),
             dict(kind="neg_inf", dtype=torch.bfloat16, backend="torch", seed=2), dict(even=True, vocab=12 * world),
             dict(dtype=D, backend="torch"), dict(rows=0), dict(kind="all_ignored", rows=9),
             dict(vocab=world + 2, rows=5, hidden=3)]
    if world > 1:
        cases.append(dict(kind="empty_slice", temperature=1.3))
    for case in cases:
        _case(m, rank, world, **case)
    m.raise_if_any()


@check
def fused_linear_partial_gradients_and_in_place_edits(rank, world):
    """One output in the loss, a frozen lm_head or frozen hidden states, and outputs edited in place after
    the loss is built: each gradient is that of the single-process op."""
    m = Mismatches()
    x, w, b, labels, bounds, ga, gb = _data(world, rows=13, hidden=11, vocab=97, scale=1.0, bias=True,
                                            kind="normal", even=False, seed=4)
    lo, hi = bounds[rank], bounds[rank + 1]
    for use in ("logprobs", "entropy"):
        for frozen in ("none", "weight", "hidden"):
            leaves = [x.clone().requires_grad_(frozen != "hidden"), w[lo:hi].clone().requires_grad_(frozen != "weight"),
                      b[lo:hi].clone()]
            full = [x.clone().requires_grad_(frozen != "hidden"), w.clone().requires_grad_(frozen != "weight"), b]
            lp, h = vp_linear(leaves[0], leaves[1], labels, bias_shard=leaves[2], vocab_start=lo, temperature=0.8)
            total = (lp.double() * ga).sum() if use == "logprobs" else (h.double() * gb).sum()
            m.true("outputs are views", not lp._is_view() and not h._is_view())
            lp.masked_fill_(labels == -100, 5.0).mul_(2.0)
            h.fill_(-3.0)
            needs = [t for t in leaves[:2] if t.requires_grad]
            got = torch.autograd.grad(total, needs)
            ref_lp, ref_h = ak.fused_linear_logprobs_and_entropy(full[0], full[1], labels, bias=full[2],
                                                                 temperature=0.8)
            ref_total = (ref_lp.double() * ga).sum() if use == "logprobs" else (ref_h.double() * gb).sum()
            want = torch.autograd.grad(ref_total, [t for t in full[:2] if t.requires_grad])
            for g_ours, g_ref, leaf in zip(got, want, needs):
                g_ref = g_ref[lo:hi] if leaf is leaves[1] else g_ref
                m.close(f"{use}, frozen {frozen}", g_ours, g_ref, 1e-5)
    m.raise_if_any()


@CHECKS.register(worlds=(1, 2))
def fused_linear_triton_row_backend(rank, world):
    """The Triton row kernels on the chunk logits (the interpreter is slow: one small case, world sizes 1 and
    2)."""
    m = Mismatches()
    _case(m, rank, world, rows=6, hidden=8, vocab=41, temperature=0.8, backend="triton")
    m.raise_if_any()


@check
def fused_linear_bad_input_across_ranks(rank, world):
    """Errors that need the other ranks' slices or row counts: raised on every rank, before any matmul."""
    m = Mismatches()
    rows, width, local = 4, 6, 5
    x, w = torch.randn(rows, width), torch.randn(local, width)
    labels = torch.randint(0, local * world, (rows,))
    m.raises("labels >= V", ValueError, "labels", lambda: vp_linear(x, w, torch.full((rows,), local * world)))
    m.raises("negative label", ValueError, "labels", lambda: vp_linear(x, w, torch.full((rows,), -3)))
    if world > 1:
        m.raises("overlapping slices", ValueError, "tile", lambda: vp_linear(x, w, labels, vocab_start=0))
        m.raises("gap", ValueError, "tile", lambda: vp_linear(x, w, labels, vocab_start=rank * (local + 1)))
        uneven = torch.randn(local + rank, width)
        m.raises("uneven widths, default start", ValueError, "vocab_start", lambda: vp_linear(x, uneven, labels))
        m.raises("rows differ", ValueError, "hidden must hold the same tokens",
                 lambda: vp_linear(torch.randn(rows + rank, width), w, torch.zeros(rows + rank, dtype=torch.long)))
    # inside skip_value_checks the default start is used unchecked; every rank drew the same shard here
    with ak.skip_value_checks():
        lp, h = vp_linear(x, w, labels)
    ref_lp, ref_h = ak.fused_linear_logprobs_and_entropy(x, w.repeat(world, 1), labels)
    m.close("skip_value_checks: logprobs", lp, ref_lp, 1e-5)
    m.close("skip_value_checks: entropy", h, ref_h, 1e-5)
    m.raise_if_any()


# ---- the runs: W gloo processes, and a world of one in this process -------------------------------------------

@pytest.mark.parametrize("world, name", CHECKS.cases(WORLDS))
def test_vocab_parallel_fused_linear(world, name, tmp_path_factory):
    assert_check_passed(CHECKS, world, name, tmp_path_factory)


@pytest.fixture
def world_of_one(tmp_path):
    """torch.distributed initialised in this process with world size 1 (group=None is then that world), for one
    test: the tests of validation and test_distributed.py expect it uninitialised."""
    assert not dist.is_initialized()
    store = tmp_path / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1,
                            timeout=timedelta(seconds=60))
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", CHECKS.names(1))
def test_world_of_one(world_of_one, name):
    CHECKS[name](0, 1)


@pytest.mark.parametrize("case", [dict(), dict(bias=False, layout="3d", temperature=0.6),
                                  dict(dtype=torch.bfloat16, budget=4 * 301 * 5), dict(backend="torch", scale=300.0)])
def test_world_of_one_equals_the_single_device_op(world_of_one, case):
    """One rank holds the whole weight: the same chunks, matmuls and row kernels as the fused op, so the outputs
    and gradients agree to a few fp32 roundings (the mixture of one slice has w = 1 and log w = 0)."""
    lp, h, ours, ref_out, ref = _case(Mismatches(), 0, 1, **case)
    for name, got, want in [("logprobs", lp, ref_out[0]), ("entropy", h, ref_out[1])] + [
            (f"grad {i}", g, r) for i, (g, r) in enumerate(zip(ours, ref))]:
        scale = want.detach().abs().max().item() if want.numel() else 0.0
        err = (got.detach().double() - want.detach().double()).abs().max().item()
        # a few roundings of the stored dtype at this magnitude (bf16 gradients: one bf16 rounding)
        ulp = 2.0 ** -7 if got.dtype == torch.bfloat16 else 2.0 ** -23
        assert err <= 4 * ulp * scale + 1e-7, f"{name}: {err:.3g} (scale {scale:.3g})"


# ---- validation without a process group, exports -------------------------------------------------------------

def _bad_calls():
    x, w, b = torch.randn(2, 5, 8), torch.randn(7, 8), torch.randn(7)
    labels = torch.randint(0, 7, (2, 5))
    f = vp_linear
    return [
        ("hidden", TypeError, lambda: f(x.numpy(), w, labels)),
        ("hidden", TypeError, lambda: f(x.long(), w.long(), labels)),
        ("weight_shard", ValueError, lambda: f(x, w[:, :7], labels)),           # width mismatch
        ("weight_shard", ValueError, lambda: f(x, w.T.contiguous(), labels)),   # [H, V_k]
        ("weight_shard", ValueError, lambda: f(x, w[0], labels)),               # not 2-D
        ("weight_shard", ValueError, lambda: f(x, w[:0], labels)),              # V_k = 0
        ("weight_shard", TypeError, lambda: f(x, w.double(), labels)),
        ("weight_shard", ValueError, lambda: f(x, w.to("meta"), labels)),
        ("bias_shard", ValueError, lambda: f(x, w, labels, bias_shard=b[:-1])),
        ("bias_shard", ValueError, lambda: f(x, w, labels, bias_shard=b[None])),
        ("bias_shard", TypeError, lambda: f(x, w, labels, bias_shard=b.half())),
        ("bias_shard", ValueError, lambda: f(x, w, labels, bias_shard=b.to("meta"))),
        ("labels", ValueError, lambda: f(x, w, labels[:, :4])),
        ("labels", TypeError, lambda: f(x, w, labels.float())),
        ("labels", ValueError, lambda: f(x, w, labels.to("meta"))),
        ("temperature", ValueError, lambda: f(x, w, labels, temperature=0.0)),
        ("ignore_index", TypeError, lambda: f(x, w, labels, ignore_index=1.5)),
        ("vocab_start", ValueError, lambda: f(x, w, labels, vocab_start=-1)),
        ("vocab_start", TypeError, lambda: f(x, w, labels, vocab_start="0")),
        ("chunk_budget_bytes", ValueError, lambda: f(x, w, labels, chunk_budget_bytes=0)),
        ("group", TypeError, lambda: f(x, w, labels, group="tp")),
        ("backend", ValueError, lambda: f(x, w, labels, backend="cuda")),
        ("not initialised", ValueError, lambda: f(x, w, labels)),
    ]


@pytest.mark.parametrize("index", range(23))
def test_bad_input_names_the_argument(index):
    assert not dist.is_initialized()   # every check above runs before the group is needed
    name, error, call = _bad_calls()[index]
    with pytest.raises(error, match=name):
        call()


def test_bad_inputs_list_is_complete():
    assert len(_bad_calls()) == 23


def test_exported_and_importable_in_either_order():
    assert "vocab_parallel_fused_linear_logprobs_and_entropy" in distributed.__all__
    assert "VocabParallelFusedLinearFunction" in distributed.__all__
    code = """
        import sys
        import aem_kernels.ops.fused_linear.vocab_parallel as linear
        from aem_kernels.distributed import vocab_parallel_fused_linear_logprobs_and_entropy as f
        assert f is linear.vocab_parallel_fused_linear_logprobs_and_entropy
        assert not any(name in sys.modules for name in ("verl", "trl", "liger_kernel"))
        print("ok")
    """
    root = REPO_ROOT
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": root}, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
