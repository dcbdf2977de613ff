"""The autograd contract (`aem_kernels.contract`) for every public token op on every backend that runs here.

Per op and backend: an in-place gradient bumps the logits' version counter (a node that saved them raises
torch's error, never reads the gradient as logits) and is refused on overlapping logits; out of place, expanded
or overlapping logits get eager fp64's gradient within the accuracy rule; double backward raises a clear error;
a temperature tensor that requires grad and non-bool flags are refused naming the argument; integer labels of
every width give identical results; a NaN in a row gives NaN gradients on that row as eager torch does. Also
the degenerate-config and short-response_group messages. Shapes are tiny (Triton runs in its interpreter).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import aem_kernels as ak
from aem_kernels.distributed import vocab_parallel_logprobs_and_entropy

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [name for name, reason in ak.available_backends(DEVICE).items() if reason is None]
ROWS, VOCAB, TAU = 6, 37, 0.7
TOKEN_RESPONSE = [0, 0, 1, 1, 2, -1]
RESPONSE_GROUP = [0, 0, 1]
ADVANTAGES = [1.0, -0.5, 0.3]
VERSION_ERROR = "modified by an inplace operation"


def _tensor(values, dtype=None):
    return torch.tensor(values, device=DEVICE, dtype=dtype)


def _inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(ROWS, VOCAB, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(0, VOCAB, (ROWS,), generator=gen)
    weights = torch.randn(2, ROWS, generator=gen, dtype=torch.float64)
    return logits.to(DEVICE), labels.to(DEVICE), weights.to(DEVICE)


def _k_labels(labels):
    return torch.stack([labels, (labels + 3) % VOCAB, labels], dim=-1)  # K = 3 with a duplicate


def _loss_kwargs(single_pass: bool):
    config = ak.AEMConfig(temperature=TAU, entropy_coef=0.05,
                          surprisal_source="old" if single_pass else "current")
    extras = dict(token_response=_tensor(TOKEN_RESPONSE), response_group=_tensor(RESPONSE_GROUP), config=config,
                  num_groups=2, single_pass=single_pass)
    if single_pass:
        extras["old_entropy"] = torch.rand(ROWS, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    return extras


def _op(name, x, labels, weights, backend, inplace=False, temperature=TAU, group=None):
    """A scalar loss of the public op `name` on [ROWS, V] logits x (fp32 outputs weighted in fp64)."""
    a, b = weights.to(torch.float32)
    opts = dict(backend=backend, inplace_backward=inplace, temperature=temperature)
    if name == "logprobs":
        return (ak.logprobs_from_logits(x, labels, **opts) * a).sum()
    if name == "logprobs_k":
        return (ak.logprobs_from_logits(x, _k_labels(labels), **opts) * a[:, None]).sum()
    if name == "selective":
        return (ak.selective_log_softmax(x, labels, temperature, backend=backend, inplace_backward=inplace)
                * a).sum()
    if name == "entropy":
        return (ak.entropy_from_logits(x, **opts) * b).sum()
    if name == "both":
        lp, h = ak.logprobs_and_entropy(x, labels, **opts)
        return (lp * a).sum() + (h * b).sum()
    if name == "vocab_parallel":
        lp, h = vocab_parallel_logprobs_and_entropy(x, labels, group=group, **opts)
        return (lp * a).sum() + (h * b).sum()
    if name in ("policy_loss", "policy_loss_single"):
        kwargs = _loss_kwargs(name == "policy_loss_single")
        if temperature is not TAU:
            kwargs["config"] = kwargs["config"].replace(temperature=temperature)
        return ak.aem_policy_loss(x, labels, _tensor(ADVANTAGES), backend=backend, inplace_backward=inplace,
                                  **kwargs)[0]
    raise ValueError(name)


def _eager(name, x, labels, weights):
    """The token op `name` in eager torch, in x's dtype (fp64 x: the reference)."""
    a, b = weights[0].to(x.dtype), weights[1].to(x.dtype)
    log_p = torch.log_softmax(x / TAU, dim=-1)
    entropy = -(log_p.exp() * torch.where(log_p.exp() > 0, log_p, 0.0)).sum(-1)
    if name == "logprobs_k":
        return (log_p.gather(-1, _k_labels(labels)) * a[:, None]).sum()
    logprobs = log_p.gather(-1, labels[:, None])[:, 0]
    if name in ("logprobs", "selective"):
        return (logprobs * a).sum()
    if name == "entropy":
        return (entropy * b).sum()
    return (logprobs * a).sum() + (entropy * b).sum()


TOKEN_OPS = ["logprobs", "logprobs_k", "selective", "entropy", "both", "vocab_parallel"]
ALL_OPS = TOKEN_OPS + ["policy_loss", "policy_loss_single"]


@pytest.fixture(scope="module")
def gloo_group(tmp_path_factory):
    """A one-process gloo group for the vocab-parallel op (world size 1: the op's own collectives run)."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    store = tmp_path_factory.mktemp("gloo") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def _cases(ops):
    return [pytest.param(op, backend, id=f"{op}-{backend}") for op in ops for backend in BACKENDS
            if op != "policy_loss_single" or backend == "triton"]


@pytest.fixture
def run(request):
    """`run(name, x, labels, weights, backend, **kw)`: `_op` with the gloo group where the op needs one."""
    def call(name, *args, **kwargs):
        group = request.getfixturevalue("gloo_group") if name == "vocab_parallel" else None
        return _op(name, *args, group=group, **kwargs)
    return call


def _grad(run, name, base, labels, weights, backend, make=lambda leaf: leaf * 1.0, **kwargs):
    leaf = base.clone().requires_grad_()
    run(name, make(leaf), labels, weights, backend, **kwargs).backward()
    return leaf.grad


def _within_accuracy_rule(got, name, base, labels, weights, make):
    """|got - fp64| <= 3 |eager fp32 - fp64| + 1e-5 elementwise bound on the max (the accuracy rule)."""
    grads = {}
    for dtype in (torch.float64, torch.float32):
        leaf = base.to(dtype).clone().requires_grad_()
        _eager(name, make(leaf), labels, weights).backward()
        grads[dtype] = leaf.grad.double()
    eager_error = (grads[torch.float32] - grads[torch.float64]).abs().max()
    error = (got.double() - grads[torch.float64]).abs().max()
    assert error <= 3 * eager_error + 1e-5, (error, eager_error)


# ---- in-place gradients -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, backend", _cases(ALL_OPS))
def test_inplace_gradient_bumps_the_logits_version(run, name, backend):
    """The issue's example: another node saved the logits; our in-place write must make it raise, not read the
    gradient as if it were the logits (the C++ path gave z.grad off by 4.1)."""
    base, labels, weights = _inputs()
    z = base.float().requires_grad_()
    zz = z * 1.0
    other = (zz ** 2).sum()  # saves zz
    loss = run(name, zz, labels, weights, backend, inplace=True)
    with pytest.raises(RuntimeError, match=VERSION_ERROR):
        (loss + other).backward()


@pytest.mark.parametrize("name, backend", _cases(ALL_OPS))
def test_inplace_gradient_without_other_readers_is_the_out_of_place_one(run, name, backend):
    base, labels, weights = _inputs()
    expected = _grad(run, name, base.float(), labels, weights, backend)
    got = _grad(run, name, base.float(), labels, weights, backend, inplace=True)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name, backend", _cases(ALL_OPS))
def test_inplace_gradient_refused_on_overlapping_logits(run, name, backend):
    base, labels, weights = _inputs()
    row = base[0].float().requires_grad_()
    # refused at the call by the public functions, or before the write by the Function's backward (what a
    # caller that applies the Function directly gets); never a gradient written twice into one element
    with pytest.raises(ValueError, match="inplace_backward"):
        run(name, row.expand(ROWS, VOCAB), labels, weights, backend, inplace=True).backward()
    assert row.grad is None
    with torch.no_grad():  # no gradient will be written: the flag changes nothing
        run(name, row.expand(ROWS, VOCAB), labels, weights, backend, inplace=True)


# ---- expanded / overlapping logits out of place ---------------------------------------------------------------

def _expand(leaf):
    return leaf[:1].expand(ROWS, VOCAB)  # stride-0 rows: one storage row seen six times


def _overlap(leaf):
    return leaf.reshape(-1).as_strided((ROWS, VOCAB), (VOCAB // 3, 1))  # rows overlapping partially


@pytest.mark.parametrize("make", [_expand, _overlap], ids=["expand", "as_strided"])
@pytest.mark.parametrize("name, backend", _cases(ALL_OPS))
def test_overlapping_logits_out_of_place(run, name, backend, make):
    """The gradient of the shared storage equals that of a contiguous copy on the same backend (autograd sums
    the aliased rows); for the token ops it is eager fp64's within the accuracy rule."""
    base, labels, weights = _inputs()
    got = _grad(run, name, base.float(), labels, weights, backend, make=make)
    copied = _grad(run, name, base.float(), labels, weights, backend, make=lambda leaf: make(leaf).contiguous())
    assert torch.equal(got, copied)
    if name in TOKEN_OPS:
        _within_accuracy_rule(got, name, base, labels, weights, make)


# ---- double backward -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, backend", _cases(ALL_OPS))
def test_double_backward_raises(run, name, backend):
    base, labels, weights = _inputs()
    leaf = base.float().requires_grad_()
    direction = torch.randn(ROWS, VOCAB, device=DEVICE)
    with pytest.raises(RuntimeError, match="first-order"):
        (grad,) = torch.autograd.grad(run(name, leaf * 1.0, labels, weights, backend), leaf, create_graph=True)
        (grad * direction).sum().backward()  # a Hessian-vector product through the op
    with pytest.raises(RuntimeError, match="first-order"):  # a gradient penalty, nothing upstream needs grad
        loss = run(name, leaf * 1.0, labels, weights, backend)
        (grad,) = torch.autograd.grad(loss, leaf, create_graph=True)
        (loss + grad.pow(2).sum()).backward(inputs=[leaf])


@pytest.mark.parametrize("name, backend", _cases(TOKEN_OPS))
def test_create_graph_first_order_gradient_is_unchanged(run, name, backend):
    base, labels, weights = _inputs()
    leaf = base.float().requires_grad_()
    (grad,) = torch.autograd.grad(run(name, leaf, labels, weights, backend), leaf, create_graph=True)
    assert grad.requires_grad and torch.equal(grad.detach(), _grad(run, name, base.float(), labels, weights, backend))


@pytest.mark.skipif(not hasattr(torch.ops.aem_kernels, "logprobs_entropy_fwd"), reason="C++ extension not built")
def test_raw_cpu_op_double_backward_raises():
    base, labels, _ = _inputs()
    leaf = base.cpu().view(1, ROWS, VOCAB).requires_grad_()
    lp, h, _ = torch.ops.aem_kernels.logprobs_entropy_fwd(leaf, labels.cpu(), TAU, -100)
    (grad,) = torch.autograd.grad(lp.sum() + h.sum(), leaf, create_graph=True)
    with pytest.raises(RuntimeError, match="first-order"):
        grad.pow(2).sum().backward()


def test_fused_linear_single_pass_loss_refuses_create_graph():
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(ROWS, 8, generator=gen, dtype=torch.float64).requires_grad_()
    weight = torch.randn(VOCAB, 8, generator=gen, dtype=torch.float64).requires_grad_()
    _, labels, _ = _inputs()
    kwargs = _loss_kwargs(single_pass=True)
    loss, _ = ak.fused_linear_aem_policy_loss(hidden, weight, labels.cpu(), _tensor(ADVANTAGES).cpu(),
                                              backend="cpu" if "cpu" in BACKENDS else "torch",
                                              **{k: v.cpu() if isinstance(v, torch.Tensor) else v
                                                 for k, v in kwargs.items()})
    with pytest.raises(RuntimeError, match="first-order"):
        torch.autograd.grad(loss, (hidden, weight), create_graph=True)
    grads = torch.autograd.grad(loss, (hidden, weight))  # first order: fine
    assert all(torch.isfinite(g).all() for g in grads)


# ---- arguments that cannot carry a gradient, flags ---------------------------------------------------------

@pytest.mark.parametrize("name, backend", _cases(ALL_OPS))
def test_temperature_tensor_requiring_grad_is_refused(run, name, backend):
    base, labels, weights = _inputs()
    tau = torch.tensor(TAU, requires_grad=True)
    with pytest.raises(TypeError, match="temperature"):
        run(name, base.float().requires_grad_(), labels, weights, backend, temperature=tau)


@pytest.mark.parametrize("name, backend", _cases(TOKEN_OPS))
def test_temperature_tensor_without_grad_is_a_constant(run, name, backend):
    base, labels, weights = _inputs()
    with_float = run(name, base.float(), labels, weights, backend)
    assert torch.equal(run(name, base.float(), labels, weights, backend, temperature=torch.tensor(TAU)), with_float)


@pytest.mark.parametrize("name, backend", _cases(ALL_OPS))
def test_non_bool_inplace_backward_is_refused(run, name, backend):
    base, labels, weights = _inputs()
    leaf = base.float().requires_grad_()
    work = leaf * 1.0
    for flag in ("no", 1, None):  # "no" is truthy: it used to overwrite the logits
        with pytest.raises(TypeError, match="inplace_backward"):
            run(name, work, labels, weights, backend, inplace=flag)
    assert torch.equal(work, leaf)  # nothing was overwritten


def test_other_bool_flags_are_refused():
    base, labels, _ = _inputs()
    with pytest.raises(TypeError, match="single_pass"):
        ak.aem_policy_loss(base.float(), labels, _tensor(ADVANTAGES), token_response=_tensor(TOKEN_RESPONSE),
                           response_group=_tensor(RESPONSE_GROUP), single_pass="no")
    with pytest.raises(TypeError, match="zscore"):
        ak.AEMConfig(zscore="no")


# ---- integer labels of any width ----------------------------------------------------------------------------

@pytest.mark.parametrize("name, backend", _cases(ALL_OPS))
def test_label_dtypes_give_identical_results(run, name, backend):
    base, labels, weights = _inputs()
    results = {}
    for dtype in (torch.uint8, torch.int16, torch.int32, torch.int64):
        leaf = base.float().requires_grad_()
        loss = run(name, leaf * 1.0, labels.to(dtype), weights, backend)
        loss.backward()
        results[dtype] = (loss.detach(), leaf.grad)
    want = results[torch.int64]
    for dtype, got in results.items():
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_narrow_labels_with_ignored_entries_and_row_mask(backend):
    base, labels, weights = _inputs()
    labels[[1, 4]] = -100
    mask = _tensor([1, 1, 0, 1, 1, 1])
    want = ak.selective_log_softmax(base.float(), labels, TAU, mask, backend=backend)
    for dtype in (torch.int16, torch.int32):
        got = ak.selective_log_softmax(base.float(), labels.to(dtype), TAU, mask, backend=backend)
        assert torch.equal(got, want), dtype
    assert (want[[1, 2, 4]] == 0).all()


# ---- non-finite logits ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, backend", _cases(TOKEN_OPS))
def test_nan_row_gives_nan_gradients_as_eager(run, name, backend):
    """A NaN anywhere in row 1: NaN gradient on all of row 1 (eager autograd's), finite elsewhere; -inf entries
    of row 3 have p = 0 and a zero gradient, no NaN."""
    base, labels, weights = _inputs()
    base[1, 5] = float("nan")
    base[3, [0, 2, 9]] = float("-inf")
    labels[3] = 4
    got = _grad(run, name, base.float(), labels, weights, backend)
    leaf = base.clone().requires_grad_()
    _eager(name, leaf, labels, weights).backward()
    assert torch.equal(got.isnan(), leaf.grad.isnan())
    assert got[1].isnan().all() and not got[[0, 2, 3, 4, 5]].isnan().any()
    assert (got[3, [0, 2, 9]] == 0).all()


def test_nan_row_policy_loss_same_on_every_backend():
    base, labels, weights = _inputs()
    base[1, 5] = float("nan")
    patterns = {be: _grad(lambda *a, **k: _op(*a, **k), "policy_loss", base.float(), labels, weights, be).isnan()
                for be in BACKENDS}
    first = next(iter(patterns.values()))
    assert first[1].all() and all(torch.equal(p, first) for p in patterns.values())


# ---- loss inputs and configs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("changes", [dict(w_max=0.0), dict(w_max=-1.0), dict(w_min=0.5, w_max=0.25)])
def test_degenerate_weight_clips_are_refused(changes):
    with pytest.raises(ValueError, match="w_max"):
        ak.AEMConfig(**changes)


def test_short_response_group_is_named():
    base, labels, _ = _inputs()
    with pytest.raises(ValueError, match="response_group needs at least 3 entries, got 2"):
        ak.aem_policy_loss(base.float(), labels, _tensor(ADVANTAGES[:2]), token_response=_tensor(TOKEN_RESPONSE),
                           response_group=_tensor(RESPONSE_GROUP[:2]))
    padded = base.float().view(2, 3, VOCAB)
    turns = _tensor([[0, 0, 1], [0, -1, -1]])
    with pytest.raises(ValueError, match=r"response_group must have shape \(2,\)"):
        ak.aem_policy_loss(padded, labels.view(2, 3), _tensor([1.0, -1.0]), turn_ids=turns,
                           response_group=_tensor([0]))
