"""The vocab-blocked fused-linear path (`ops/fused_linear/blocked.py`) that bf16/fp16 hidden states take on the CPU and
torch backends: values and the three gradients against fp64 of the materialised logits under the accuracy
rule (many blocks, 1-column blocks, hidden upcast in pieces, odd vocabularies, labels in the first and last
block, ignored rows, -inf logits, |z| ~ 1e4, temperatures 0.3-3), agreement with the chunked path, the
dispatch, and a structural memory check: no fp32 [V, H] and no [N, V] tensor is ever created."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import aem_kernels as ak
from aem_kernels.ops.fused_linear import (FusedLinearLogprobsEntropyFunction, blocked, chunked, fused_linear_path,
                                          resolve_fused_linear_path)
from aem_kernels.ops.fused_linear.plan import BlockPlan, block_plan
from aem_kernels.ops.logprobs import resolve_backend
from fused_linear_checks import assert_rule, check_against_rule, grads, linear_inputs, materialised, max_error

HALF = [torch.bfloat16, torch.float16]
ROW_BACKENDS = ["cpu", "torch"]
N_ACTIVE = 35   # _inputs' default: 37 rows, 2 of them ignored


def _budget(columns: int, rows: int = N_ACTIVE) -> int:
    """The budget whose fp32 [rows, columns] logits buffer gives blocks of `columns` columns."""
    return 4 * rows * columns


# ---- accuracy --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ROW_BACKENDS)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("budget", [None, 1, _budget(7), 4 * N_ACTIVE * 29, 10 ** 9],
                         ids=["default", "1-column", "7-columns-hidden-pieces", "29-columns", "one-block"])
def test_values_and_gradients_follow_the_accuracy_rule(backend, dtype, budget):
    x, w, b, labels, ga, gb = linear_inputs(dtype=dtype, vocab=303)   # 303 = 43 x 7 + 2: a narrow last block
    plan = block_plan(37, N_ACTIVE, 303, 29, dtype, budget)
    if budget == _budget(7):
        assert plan.columns == 7 and plan.blocks(303) == 44 and plan.hidden_rows == _budget(7) // (8 * 29)
    if budget == 1:
        assert plan == (1, 1)
    if budget == 4 * N_ACTIVE * 29:
        assert plan == (29, N_ACTIVE)   # the hidden rows fit the budget whole: one upcast
    check_against_rule(backend, x, w, b, labels, ga, gb, temperature=0.7, chunk_budget_bytes=budget)


@pytest.mark.parametrize("dtype", HALF)
def test_labels_in_the_first_and_last_block(dtype):
    x, w, b, labels, ga, gb = linear_inputs(shape=(12,), dtype=dtype, vocab=101, ignore=())
    labels[:4] = torch.tensor([0, 1, 2, 3])       # first block of 4 columns
    labels[4:8] = torch.tensor([100, 99, 97, 96])  # 101 = 25 x 4 + 1: the last block is column 100 alone
    assert block_plan(12, 12, 101, 29, dtype, _budget(4, 12)).columns == 4
    check_against_rule("cpu", x, w, b, labels, ga, gb, temperature=1.3, chunk_budget_bytes=_budget(4, 12))


@pytest.mark.parametrize("backend", ROW_BACKENDS)
@pytest.mark.parametrize("scale", [30.0, 3000.0])
@pytest.mark.parametrize("temperature", [0.3, 3.0])
def test_large_logit_magnitudes_across_blocks(backend, scale, temperature):
    # logits of std ~ 3 * scale: up to ~1e4; the label's block and the mass's block differ for most rows
    x, w, b, labels, ga, gb = linear_inputs(scale=scale, vocab=517, hidden=24, dtype=torch.bfloat16)
    check_against_rule(backend, x, w, b, labels, ga, gb, temperature=temperature, chunk_budget_bytes=_budget(16))


@pytest.mark.parametrize("dtype", HALF)
def test_3d_hidden_no_bias_strided(dtype):
    x, w, _, labels, ga, gb = linear_inputs(shape=(2, 19), hidden=37, vocab=683, bias=False, ignore=(0, 20, 37),
                                      dtype=dtype)
    strided = torch.zeros(19, 2, 37, dtype=dtype)
    strided.copy_(x.transpose(0, 1))
    x = strided.transpose(0, 1)                    # [2, 19, 37], not contiguous
    assert not x.is_contiguous()
    check_against_rule("cpu", x, w, None, labels, ga, gb, temperature=2.5, chunk_budget_bytes=_budget(50, 35))


def test_bias_minus_inf_columns_and_an_empty_block():
    """-inf bias entries give -inf logits (p = 0); a whole block of them holds no mass for any row."""
    x, w, b, labels, ga, gb = linear_inputs(shape=(30,), dtype=torch.bfloat16, vocab=97)
    b[14:21] = float("-inf")                       # block 2 of 7 columns: empty for every row
    b[torch.tensor([0, 40, 96])] = float("-inf")
    labels[(labels >= 14) & (labels < 21) | (labels == 0) | (labels == 40) | (labels == 96)] = 5
    check_against_rule("cpu", x, w, b, labels, ga, gb, chunk_budget_bytes=_budget(7, 28))
    check_against_rule("torch", x, w, b, labels, ga, gb, chunk_budget_bytes=_budget(7, 28))


def test_weight_minus_inf_gives_minus_inf_logits():
    x, w, b, labels, _, _ = linear_inputs(shape=(20,), dtype=torch.bfloat16, vocab=61, ignore=())
    x[:, 0] = x[:, 0].abs() + 0.5                  # so that W[v, 0] = -inf makes z_v = -inf on every row
    w[torch.tensor([3, 30, 60]), 0] = float("-inf")
    labels[(labels == 3) | (labels == 30) | (labels == 60)] = 7
    lp, ent = ak.fused_linear_logprobs_and_entropy(x, w, labels, bias=b, chunk_budget_bytes=_budget(5, 20))
    eager, truth = (materialised(x, w, b, labels, 1.0, dt) for dt in (torch.float32, torch.float64))
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    assert_rule("logprobs", lp, eager[0], truth[0])
    assert_rule("entropy", ent, eager[1], truth[1])


def test_rows_without_a_distribution_are_nan_like_the_chunked_path():
    """A NaN hidden state, and a row whose logits are all -inf, give NaN (not a silent number)."""
    x, w, b, labels, _, _ = linear_inputs(shape=(6,), dtype=torch.bfloat16, vocab=40, ignore=())
    x[2, 0] = float("nan")
    w[:, 0] = -(w[:, 0].abs() + 0.1)
    x[4, 0] = float("inf")                         # z[4, v] = -inf for every v
    lp, ent = ak.fused_linear_logprobs_and_entropy(x, w, labels, bias=b, chunk_budget_bytes=_budget(8, 6))
    lp_c, ent_c = FusedLinearLogprobsEntropyFunction.apply(x, w, b, labels, 1.0, -100, True,
                                                           fused_linear_path(CHUNKED),
                                                           (False, None, labels.shape))
    bad = torch.tensor([False, False, True, False, True, False])
    for ours, theirs in ((lp, lp_c), (ent, ent_c)):
        assert torch.equal(torch.isnan(ours), bad) and torch.equal(torch.isnan(theirs), bad)
        assert torch.isfinite(ours[~bad]).all()


# ---- ignored rows, empty inputs, partial gradients ---------------------------------------------------------

@pytest.mark.parametrize("backend", ROW_BACKENDS)
def test_all_ignored_and_empty(backend):
    x, w, b, labels, ga, gb = linear_inputs(shape=(9,), dtype=torch.bfloat16, ignore=range(9))
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    lp, ent = ak.fused_linear_logprobs_and_entropy(*leaves[:2], labels, bias=leaves[2], backend=backend,
                                                   chunk_budget_bytes=64)
    assert torch.equal(lp, torch.zeros(9)) and torch.equal(ent, torch.zeros(9))
    for g, leaf in zip(grads((lp, ent), leaves, ga, gb), leaves):
        assert g.dtype == leaf.dtype and torch.equal(g, torch.zeros_like(g))
    hidden = x[:0].clone().requires_grad_()
    lp, ent = ak.fused_linear_logprobs_and_entropy(hidden, w, labels[:0], backend=backend)
    (lp.sum() + ent.sum()).backward()
    assert lp.shape == (0,) and hidden.grad.shape == (0, 29)


def test_ignored_rows_are_zero_and_others_unchanged():
    x, w, b, labels, ga, gb = linear_inputs(shape=(24,), dtype=torch.float16, ignore=(0, 5, 6, 23))
    lp, ent, grads = check_against_rule("cpu", x, w, b, labels, ga, gb, chunk_budget_bytes=_budget(9, 20))
    ignored = labels == -100
    assert torch.equal(lp[ignored], torch.zeros(4)) and torch.equal(ent[ignored], torch.zeros(4))
    assert torch.equal(grads[0][ignored], torch.zeros(4, 29, dtype=torch.float16))


@pytest.mark.parametrize("wanted", [(True, False, False), (False, True, False), (False, False, True)])
def test_only_some_gradients_and_without_entropy(wanted):
    x, w, b, labels, ga, _ = linear_inputs(dtype=torch.bfloat16)
    leaves = [t.clone().requires_grad_(want) for t, want in zip((x, w, b), wanted)]
    lp, ent = ak.fused_linear_logprobs_and_entropy(*leaves[:2], labels, bias=leaves[2], with_entropy=False,
                                                   chunk_budget_bytes=_budget(10))
    assert ent is None
    (grad,) = torch.autograd.grad((lp * ga.float()).sum(), [t for t in leaves if t.requires_grad])
    full = [t.clone().requires_grad_() for t in (x, w, b)]
    lp_full, _ = ak.fused_linear_logprobs_and_entropy(*full[:2], labels, bias=full[2],
                                                      chunk_budget_bytes=_budget(10))
    ref = torch.autograd.grad((lp_full * ga.float()).sum(), full)[wanted.index(True)]
    assert torch.equal(lp, lp_full) and torch.equal(grad, ref)


# ---- the chunked path, dispatch, determinism, the plan ------------------------------------------------------

# A path runs any dtype: "cpu-chunked" on bf16/fp16 is the row-chunk path the resolver takes for fp32 (an fp32
# copy of the weight and an fp32 [V, H] gradient), for comparison with "cpu-blocked".
CHUNKED, BLOCKED = "cpu-chunked", "cpu-blocked"


def _run(path, x, w, b, labels, ga, gb, temperature=1.0, budget=None):
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    lp, ent = FusedLinearLogprobsEntropyFunction.apply(leaves[0], leaves[1], leaves[2], labels, temperature, -100,
                                                       True, path, (False, budget, labels.shape))
    return (lp, ent) + tuple(grads((lp, ent), leaves, ga, gb))


@pytest.mark.parametrize("dtype", HALF)
def test_agrees_with_the_chunked_path_within_the_rule(dtype):
    x, w, b, labels, ga, gb = linear_inputs(dtype=dtype, vocab=411, hidden=40)
    by_blocks = _run(fused_linear_path(BLOCKED), x, w, b, labels, ga, gb, 0.8, _budget(13))
    by_rows = _run(fused_linear_path(CHUNKED), x, w, b, labels, ga, gb, 0.8)
    eager, truth = (materialised(x, w, b, labels, 0.8, dt) for dt in (torch.float32, torch.float64))
    eager_all = eager[:2] + grads(eager[:2], eager[2], ga, gb)
    truth_all = truth[:2] + grads(truth[:2], truth[2], ga, gb)
    names = ("logprobs", "entropy", "grad hidden", "grad weight", "grad bias")
    for name, ours, theirs, eag, tru in zip(names, by_blocks, by_rows, eager_all, truth_all):
        eag = eag.to(ours.dtype)     # half-precision gradients end rounded to the leaf's dtype
        assert ours.dtype == theirs.dtype
        assert max_error(ours, theirs) <= 3 * max_error(eag, tru) + 1e-5, name


def test_dispatch_takes_the_blocked_path_for_half_precision_only():
    cpu = torch.device("cpu")
    x, w, b, labels, _, _ = linear_inputs()
    for backend in ROW_BACKENDS:
        for dtype, blocked in ((torch.bfloat16, True), (torch.float16, True), (torch.float32, False)):
            be = resolve_fused_linear_path(backend, cpu, dtype)
            *_, saved = be.forward(x.to(dtype).reshape(-1, 29), w.to(dtype), b.to(dtype), labels, 1.0, -100,
                                   True, budget=None)
            assert isinstance(saved[1], BlockPlan) == blocked, (backend, dtype)
    assert resolve_fused_linear_path("auto", cpu, torch.bfloat16) is resolve_fused_linear_path("cpu", cpu,
                                                                                                     torch.bfloat16)


def test_deterministic():
    x, w, b, labels, ga, gb = linear_inputs(dtype=torch.bfloat16, vocab=257)
    be = resolve_fused_linear_path("cpu", torch.device("cpu"), torch.bfloat16)
    first, second = (_run(be, x, w, b, labels, ga, gb, 1.0, _budget(9)) for _ in range(2))
    assert all(torch.equal(a, c) for a, c in zip(first, second))


def test_block_plan():
    plan = block_plan(4096, 4096, 32000, 1024, torch.bfloat16)
    # default budget: bf16 logits / 64 = 4 096 000 bytes -> 250 columns; hidden in pieces of half of it
    assert plan.columns == 250 and plan.blocks(32000) == 128 and plan.hidden_rows == 500
    assert block_plan(8, 8, 1000, 64, torch.bfloat16) == (1000, 8)   # the 1 MiB floor: one block
    big = block_plan(65536, 65536, 151936, 4096, torch.bfloat16)       # the 256 MiB ceiling
    assert big.columns == (1 << 28) // (4 * 65536)
    assert block_plan(4096, 1000, 32000, 1024, torch.bfloat16).columns == 4096000 // 4000
    assert block_plan(4096, 4096, 100, 1024, torch.bfloat16).columns == 100   # at most V
    assert block_plan(10, 10, 50, 8, torch.float16, 1) == (1, 1)
    assert block_plan(10, 10, 50, 8, torch.float16, 4 * 10 * 3) == (3, 1)


# ---- memory: what the path allocates ------------------------------------------------------------------------

class _Allocations(TorchDispatchMode):
    """(op, shape, dtype) of every tensor an aten op returns while active, autograd's backward included."""

    def __init__(self):
        super().__init__()
        self.outputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.outputs += [(str(func), tuple(t.shape), t.dtype) for t in tree_flatten(out)[0]
                         if isinstance(t, torch.Tensor)]
        return out


def _large_temporaries(path, dtype=torch.bfloat16, budget=_budget(40, 62)):
    """Tensors of >= 1/4 of V x H or N x V elements that a forward + backward makes, besides the gradients of
    hidden and weight (one each, in their dtype: the op's outputs)."""
    n, hidden, vocab = 64, 96, 1999   # 40-column blocks (50 of them), the hidden rows upcast in pieces
    x, w, b, labels, ga, gb = linear_inputs(shape=(n,), hidden=hidden, vocab=vocab, dtype=dtype, ignore=(1, 2))
    # the path's own forward and backward (through the autograd Function they run inside one custom op each,
    # whose inner allocations a dispatch mode does not see)
    with _Allocations() as seen:
        _, ent, saved = path.forward(x, w, b, labels, 1.0, -100, True, budget=budget)
        path.backward(x, w, b, labels, saved, ent, ga.float(), gb.float(), 1.0, -100, (True, True, True), False)
    limit = min(vocab * hidden, n * vocab) // 4
    large = [o for o in seen.outputs if torch.Size(o[1]).numel() >= limit]
    for grad in (((n, hidden), dtype), ((vocab, hidden), dtype)):
        made = [o for o in large if (o[1], o[2]) == grad]
        if len(made) == 1:
            large.remove(made[0])
    return large


@pytest.mark.parametrize("dtype", HALF)
def test_no_fp32_weight_copy_nor_logits_sized_buffer(dtype):
    assert block_plan(64, 62, 1999, 96, dtype, _budget(40, 62)) == (40, 12)
    assert _large_temporaries(fused_linear_path(BLOCKED), dtype) == []
    # the check can fail: the chunked path makes an fp32 copy of the weight and an fp32 [V, H] gradient
    flagged = _large_temporaries(fused_linear_path(CHUNKED), dtype, None)
    assert any(shape == (1999, 96) and dt == torch.float32 for _, shape, dt in flagged)
    # and the public function, through the dispatcher, takes the blocked path
    assert _large_temporaries(resolve_fused_linear_path("auto", torch.device("cpu"), dtype), dtype) == []


def _peak_beyond_gradients(path, n, hidden, vocab, budget):
    """Peak tensor bytes of a forward + backward beyond its inputs, minus the two gradients it returns
    (torch's memory profiler, as the benchmarks measure it on the CPU)."""
    from bench.measure import peak_memory

    x, w, _, labels, ga, gb = linear_inputs(shape=(n,), hidden=hidden, vocab=vocab, dtype=torch.bfloat16, bias=False,
                                      ignore=())
    x.requires_grad_()
    w.requires_grad_()
    ga, gb = ga.float(), gb.float()

    def call():
        lp, ent = FusedLinearLogprobsEntropyFunction.apply(x, w, None, labels, 1.0, -100, True, path,
                                                           (False, budget, labels.shape))
        return torch.autograd.grad((lp * ga).sum() + (ent * gb).sum(), [x, w])

    grads, peak = peak_memory(torch.device("cpu"), call)
    return peak - sum(g.numel() * g.element_size() for g in grads)


def test_peak_memory_is_the_plan_s():
    """The measured peak stays within what the module docstring promises: in the backward the logits block,
    the fp32 weight block and its gradient, the fp32 hidden rows and grad_hidden accumulator; in the forward
    the O(N x blocks) statistics and their combination's fp64 pieces; O(N) and O(V_block) vectors besides."""
    n, hidden, vocab = 256, 64, 4099
    budget = 4 * n * 512                           # 512-column blocks (9 of them); the hidden rows fit whole
    plan = block_plan(n, n, vocab, hidden, torch.bfloat16, budget)
    assert plan == (512, n) and plan.blocks(vocab) == 9
    stats = n * plan.blocks(vocab)
    forward = 12 * stats + 80 * min(stats, blocked.COMBINE_ELEMENTS) + 64 * n
    backward = budget + 8 * plan.columns * hidden + 8 * n * hidden + 64 * n + 64 * plan.columns
    by_blocks = _peak_beyond_gradients(fused_linear_path(BLOCKED), n, hidden, vocab, budget)
    assert 0 < by_blocks <= max(forward, backward), (by_blocks, forward, backward)
    # the measure can fail: the chunked path holds an fp32 copy of the weight (4 V H) and of its gradient
    by_rows = _peak_beyond_gradients(fused_linear_path(CHUNKED), n, hidden, vocab, budget)
    assert by_rows > 8 * vocab * hidden > max(forward, backward)


@pytest.mark.parametrize("single_pass", [False, True])
def test_chunked_path_stages_no_copy_of_the_active_rows(single_pass):
    """With ignored rows (prompts, padding) the fp32 chunked path gathers each chunk's rows and scatters each
    chunk's hidden gradient: no [N_active, H] copy of the hidden states or staging of their gradient."""
    n, hidden, vocab = 96, 40, 301
    x, w, b, labels, ga, gb = linear_inputs(shape=(n,), hidden=hidden, vocab=vocab, dtype=torch.float32,
                                      ignore=tuple(range(0, n, 3)))
    n_active = int((labels != -100).sum())
    row = resolve_backend("cpu", torch.device("cpu"), torch.float32)
    budget = 4 * vocab * 16   # 16-row chunks
    with _Allocations() as seen:
        if single_pass:
            def token_grads(index, lp, ent):
                return ga.float()[index], gb.float()[index]
            chunked.chunked_single_pass(row, x, w, b, labels, 1.0, -100, token_grads, (True, True, True),
                                                budget=budget)
        else:
            _, ent, saved = chunked.chunked_fwd(row, x, w, b, labels, 1.0, -100, True, budget=budget)
            chunked.chunked_bwd(row, x, w, b, labels, saved, ga.float(), gb.float(), 1.0, -100,
                                        (True, True, True))
    staged = [o for o in seen.outputs if o[1] == (n_active, hidden)]
    assert staged == []
    assert any(o[1] == (16, hidden) for o in seen.outputs)   # the per-chunk gathers: the recorder sees them
