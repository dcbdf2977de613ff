"""The fused-linear op's structure: each path's chunk plan from the one budget knob (`plan.py`) and the Triton
path's refusal of it, the one chunk loop (`loop.py`) that every BLAS pass runs (a spy row backend sees every
active row once per pass, in order, in buffers of the plan's size), the vocab-parallel op's path taken from the
op's decision, and the autograd contract of the two Functions: first-order only, a double backward raises."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

import aem_kernels as ak
from aem_kernels.distributed import vocab_parallel_fused_linear_logprobs_and_entropy as vp_linear
from aem_kernels.ops.fused_linear import (blocked, check_budget, chunked, fused_linear_path,
                                          resolve_fused_linear_path, vocab_parallel)
from aem_kernels.ops.fused_linear import plan as P
from aem_kernels.ops.fused_linear.loop import ActiveRows, RowChunks, VocabBlocks, chunk_loop
from aem_kernels.ops.logprobs import Backend, resolve_backend
from fused_linear_checks import BACKENDS, device_for, linear_inputs

CPU = torch.device("cpu")
N, N_ACTIVE, H, V = 37, 35, 29, 301   # linear_inputs' default: rows 3 and 11 ignored


def _spy(row: Backend):
    """(a row backend that records each call's (kind, rows, columns, labels), the record)."""
    calls = []

    def forward(z3, labels, *args, **kwargs):
        calls.append(("forward", z3.shape[1], z3.shape[2], labels.clone()))
        return row.forward(z3, labels, *args, **kwargs)

    def backward(z3, labels, *args):
        calls.append(("backward", z3.shape[1], z3.shape[2], labels.clone()))
        return row.backward(z3, labels, *args)

    return Backend("spy", forward, backward), calls


def _seen(calls, kind):
    return [c for c in calls if c[0] == kind]


@pytest.fixture
def world_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


# ---- the plans and the budget knob -----------------------------------------------------------------------------

def test_each_path_s_plan_from_the_budget():
    # chunked: [rows, V] in the working dtype (fp64 for fp64 inputs); at least one row, at most all of them
    assert P.chunk_plan(N, V, torch.float32, 4 * V * 5) == 5
    assert P.chunk_plan(N, V, torch.bfloat16, 4 * V * 5) == 5
    assert P.chunk_plan(N, V, torch.float64, 8 * V * 5) == 5 and P.chunk_plan(N, V, torch.float64, 4 * V * 5) == 2
    assert P.chunk_plan(N, V, torch.float32, 1) == 1 and P.chunk_plan(N, V, torch.float32, 10 ** 9) == N
    # blocked: fp32 [N_active, columns]; the hidden rows whole when they fit the budget, else half of it
    assert P.block_plan(N, N_ACTIVE, V, H, torch.bfloat16, 4 * N_ACTIVE * 7) == (7, 4 * N_ACTIVE * 7 // (8 * H))
    assert P.block_plan(N, N_ACTIVE, V, H, torch.float16, 4 * N_ACTIVE * H) == (H, N_ACTIVE)
    assert P.block_plan(N, N_ACTIVE, V, H, torch.bfloat16, 10 ** 9).columns == V
    # vocab-parallel: the chunked plan for this rank's V_k columns (its default sized by the shard's logits)
    assert P.vocab_parallel_plan(N, 100, torch.float32, 4 * 100 * 3) == 3
    # at 65536 rows the full vocabulary's default hits the 1 GiB ceiling (1766 rows), a shard's does not (N / 16)
    assert P.vocab_parallel_plan(65536, 151936 // 8, torch.float32) == 65536 // 16
    assert P.chunk_plan(65536, 151936, torch.float32) == (1 << 30) // (4 * 151936)


@pytest.mark.parametrize("budget", [None, 1, 4 * V * 6, 10 ** 9])
def test_the_chunked_path_s_buffer_is_the_plan_s(budget):
    spy, calls = _spy(resolve_backend("torch", CPU, torch.float32))
    x, w, b, labels, _, _ = linear_inputs()
    chunked.chunked_fwd(spy, x, w, b, labels, 1.0, -100, True, budget=budget)
    rows = P.chunk_plan(N, V, torch.float32, budget)
    assert [c[1] for c in calls] == [min(rows, N_ACTIVE - s) for s in range(0, N_ACTIVE, rows)]
    assert all(c[2] == V for c in calls)
    if budget is not None and 1 < budget < 10 ** 9:
        assert 4 * calls[0][1] * V == budget


@pytest.mark.parametrize("budget", [None, 1, 4 * N_ACTIVE * 13])
def test_the_blocked_path_s_buffer_is_the_plan_s(budget):
    spy, calls = _spy(resolve_backend("torch", CPU, torch.bfloat16))
    x, w, b, labels, _, _ = linear_inputs(dtype=torch.bfloat16)
    blocked.blocked_fwd(spy, x, w, b, labels, 1.0, -100, True, budget=budget)
    columns = P.block_plan(N, N_ACTIVE, V, H, torch.bfloat16, budget).columns
    assert [c[2] for c in calls] == [min(columns, V - v) for v in range(0, V, columns)]
    assert all(c[1] == N_ACTIVE for c in calls)
    if budget == 4 * N_ACTIVE * 13:
        assert 4 * N_ACTIVE * calls[0][2] == budget


def test_triton_refuses_a_budget_the_others_honour_it():
    x, w, b, labels, _, _ = linear_inputs(shape=(5,), vocab=40)
    dev = device_for("triton")
    with pytest.raises(ValueError, match="chunk_budget_bytes.*Triton"):
        ak.fused_linear_logprobs_and_entropy(x.to(dev), w.to(dev), labels.to(dev), backend="triton",
                                             chunk_budget_bytes=4096, path="tiles")
    with pytest.raises(ValueError, match="chunk_budget_bytes.*Triton"):
        ak.fused_linear_aem_policy_loss(x.to(dev), w.to(dev), labels.to(dev), torch.ones(1, device=dev),
                                        token_response=torch.zeros(5, dtype=torch.long, device=dev),
                                        response_group=torch.zeros(1, dtype=torch.long, device=dev),
                                        backend="triton", chunk_budget_bytes=4096, path="tiles")
    with pytest.raises(ValueError, match="chunk_budget_bytes.*Triton"):
        check_budget(4096, fused_linear_path("triton"))
    assert check_budget(None, fused_linear_path("triton")) is None
    for key in ("cpu-chunked", "torch-blocked", "triton-chunked", "cpu-chunked-tc"):
        assert check_budget(4096, fused_linear_path(key)) == 4096
    for bad in (0, -1, 2.0, True, "1"):
        with pytest.raises(ValueError, match="chunk_budget_bytes"):
            check_budget(bad)


# ---- the one chunk loop ------------------------------------------------------------------------------------

@pytest.mark.parametrize("ignore", [(3, 11, 12, 36), ()])
def test_row_chunks_visit_every_active_row_once_in_one_buffer(ignore):
    x, w, b, labels, _, _ = linear_inputs(dtype=torch.bfloat16, ignore=ignore)
    rows = ActiveRows(labels, -100)
    active = (labels != -100).nonzero().squeeze(1)
    assert rows.n_active == len(active) and (rows.index is None) == (not ignore)
    seen = []
    chunk_loop(RowChunks(x, rows, w, b, 8, torch.float32), lambda c: seen.append(
        (c.number, c.start, c.stop, c.x.clone(), c.z.clone(), c.z.data_ptr(), c.weight.dtype)))
    assert [s[0] for s in seen] == list(range(len(seen)))
    assert [s[1:3] for s in seen] == [(s, min(s + 8, len(active))) for s in range(0, len(active), 8)]
    assert len({s[5] for s in seen}) == 1 and {s[6] for s in seen} == {torch.float32}   # one fp32 buffer
    assert torch.equal(torch.cat([s[3] for s in seen]), x[active].float())
    for s in seen:   # each chunk's logits: its rows times the fp32 weight, plus the bias
        assert torch.equal(s[4], s[3] @ w.float().T + b.float())
    nothing = []
    chunk_loop(RowChunks(x, ActiveRows(torch.full_like(labels, -100), -100), w, b, 8, torch.float32), nothing.append)
    assert nothing == []


def test_vocab_blocks_visit_every_column_once_over_every_active_row():
    x, w, b, labels, _, _ = linear_inputs(dtype=torch.bfloat16)
    rows = ActiveRows(labels, -100)
    labels_active = rows.pick(labels)
    plan = P.BlockPlan(columns=40, hidden_rows=9)   # hidden rows upcast in pieces of 9
    seen = []
    chunk_loop(VocabBlocks(x, rows, labels_active, w, b, plan), lambda blk: seen.append(
        (blk.start, blk.stop, blk.z.clone(), blk.in_block.clone(), blk.local.clone())))
    assert [s[:2] for s in seen] == [(v, min(v + 40, V)) for v in range(0, V, 40)]
    z = torch.cat([s[2] for s in seen], dim=1)
    torch.testing.assert_close(z, x[labels != -100].float() @ w.float().T + b.float(), rtol=1e-6, atol=1e-6)
    owner = torch.stack([s[3] for s in seen]).int()
    assert torch.equal(owner.sum(0), torch.ones(N_ACTIVE, dtype=torch.int))   # each label in one block
    for v0, _, _, in_block, local in seen:
        assert torch.equal(local[in_block] + v0, labels_active[in_block])


def _rows_seen(calls, kind):
    """The labels of each call of `kind`, concatenated (every active row once, in order, per pass)."""
    return torch.cat([c[3] for c in _seen(calls, kind)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_pass_sees_every_active_row_once(dtype):
    x, w, b, labels, ga, gb = linear_inputs(dtype=dtype)
    spy, calls = _spy(resolve_backend("torch", CPU, dtype))
    active = labels[labels != -100]
    run = blocked if dtype == torch.bfloat16 else chunked
    fwd, bwd = (run.blocked_fwd, run.blocked_bwd) if run is blocked else (run.chunked_fwd, run.chunked_bwd)
    budget = 4 * N_ACTIVE * 17 if run is blocked else 4 * V * 6
    _, _, saved = fwd(spy, x, w, b, labels, 1.0, -100, True, budget=budget)
    bwd(spy, x, w, b, labels, saved, ga.float(), gb.float(), 1.0, -100, (True, True, True))
    if run is chunked:
        for kind in ("forward", "backward"):
            assert torch.equal(_rows_seen(calls, kind), active)
        calls.clear()
        chunked.chunked_single_pass(spy, x, w, b, labels, 1.0, -100, lambda i, lp, ent: (ga[i].float(), None),
                                    (True, True, True), budget=budget)
        assert torch.equal(_rows_seen(calls, "forward"), active) and torch.equal(_rows_seen(calls, "backward"), active)
    else:   # every block sees all active rows: forward, then the backward's recomputation and backward
        blocks = P.block_plan(N, N_ACTIVE, V, H, dtype, budget).blocks(V)
        assert len(_seen(calls, "forward")) == 2 * blocks and len(_seen(calls, "backward")) == blocks
        assert all(c[1] == N_ACTIVE for c in calls)


def test_the_vocab_parallel_op_runs_the_loop_on_its_decided_path(world_of_one, monkeypatch):
    x, w, b, labels, ga, gb = linear_inputs()
    decided = []
    spy, calls = _spy(resolve_backend("torch", CPU, torch.float32))

    def decide(backend, device, dtype, *, vocab_parallel=False, path="auto"):
        path = resolve_fused_linear_path(backend, device, dtype, vocab_parallel=vocab_parallel, path=path)
        decided.append((backend, vocab_parallel, path.key))
        return dataclasses.replace(path, row=spy)

    monkeypatch.setattr(vocab_parallel, "resolve_fused_linear_path", decide)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    lp, ent = vp_linear(leaves[0], leaves[1], labels, bias_shard=leaves[2], backend="torch",
                        chunk_budget_bytes=4 * V * 6)
    ((lp * ga).sum() + (ent * gb).sum()).backward()
    assert decided == [("torch", True, "torch-chunked")]
    active = labels[labels != -100]
    for kind in ("forward", "backward"):
        assert torch.equal(_rows_seen(calls, kind), active)
        assert [c[1] for c in _seen(calls, kind)] == [6] * 5 + [5] and all(c[2] == V for c in calls)
    ref = [t.clone().requires_grad_() for t in (x, w, b)]
    lp_ref, ent_ref = ak.fused_linear_logprobs_and_entropy(ref[0], ref[1], labels, bias=ref[2], backend="torch",
                                                           chunk_budget_bytes=4 * V * 6)
    ((lp_ref * ga).sum() + (ent_ref * gb).sum()).backward()
    for ours, theirs in zip((lp, ent) + tuple(t.grad for t in leaves), (lp_ref, ent_ref) + tuple(t.grad for t in ref)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


# ---- the path decision -------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["auto", "cpu", "torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_the_vocab_parallel_decision_is_row_chunks_on_the_row_backend_s_choice(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        with pytest.raises(ak.BackendUnavailableError):
            resolve_fused_linear_path(backend, CPU, dtype, vocab_parallel=True)
        return
    path = resolve_fused_linear_path(backend, CPU, dtype, vocab_parallel=True)
    row = resolve_backend(backend, CPU, dtype)
    assert path.key == f"{row.name}-chunked" and path.row.name == row.name
    single = resolve_fused_linear_path(backend, CPU, dtype).key
    assert single.endswith("-blocked") == (dtype in (torch.bfloat16, torch.float16) and backend != "triton")


# ---- first-order only -------------------------------------------------------------------------------------

def _first_order(fn, leaves, upstream, create_graph):
    lp, ent = fn(*leaves)
    return torch.autograd.grad((lp * upstream).sum() + ent.sum(), leaves, create_graph=create_graph)


def _assert_first_order_only(fn, leaves):
    upstream = torch.linspace(-1, 1, 5, device=leaves[0].device)
    plain = _first_order(fn, leaves, upstream, False)
    assert all(g.grad_fn is None for g in plain)
    for up in (upstream, upstream.clone().requires_grad_()):   # an upstream gradient with and without a graph
        graphed = _first_order(fn, leaves, up, True)
        for g, p in zip(graphed, plain):
            assert torch.equal(g.detach(), p) and g.requires_grad
        penalty = sum(g.square().sum() for g in graphed)
        for inputs in (leaves, leaves[1:], [up] if up.requires_grad else leaves[:1]):
            # never a silent None / zero second derivative, allow_unused included
            with pytest.raises(RuntimeError, match="first-order only"):
                torch.autograd.grad(penalty, inputs, retain_graph=True, allow_unused=True)
        with pytest.raises(RuntimeError, match="first-order only"):
            penalty.backward()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_is_first_order_only(backend, dtype):
    dev = device_for(backend)
    x, w, b, labels, _, _ = linear_inputs(shape=(5,), vocab=40, hidden=8, dtype=dtype, ignore=(1,))
    leaves = [t.to(dev).requires_grad_() for t in (x, w, b)]

    def fn(h, weight, bias):
        return ak.fused_linear_logprobs_and_entropy(h, weight, labels.to(dev), bias=bias, backend=backend,
                                                    deterministic=True)   # the same bits on every call

    _assert_first_order_only(fn, leaves)


def test_vocab_parallel_fused_linear_is_first_order_only(world_of_one):
    x, w, b, labels, _, _ = linear_inputs(shape=(5,), vocab=40, hidden=8, ignore=(1,))
    leaves = [t.requires_grad_() for t in (x, w, b)]

    def fn(h, weight, bias):
        return vp_linear(h, weight, labels, bias_shard=bias, backend="torch")

    _assert_first_order_only(fn, leaves)
