"""What drop-in users do with the outputs: edit them in place, and run the ops under torch.compile.

The token ops return ordinary tensors (not views made inside the autograd Function), so `masked_fill_`,
`mul_`, `add_` and in-place edits of a slice work, and the gradient afterwards is the autograd gradient of the
same edit applied to the eager formula. The backward keeps its own copies of what it saved, so an edit such
as `entropy.add_(5)` cannot change the gradient (the entropy term of eq. 2's gradient uses h_t).
"""

import pytest
import torch

import aem_kernels as ak
from aem_kernels.layout import rows3d_needs_copy
from helpers import DEVICE

pytestmark = [pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]

TEMPERATURE = 0.7
BACKENDS = [pytest.param("torch"),
            pytest.param("cpu", marks=pytest.mark.skipif(ak.available_backends("cpu")["cpu"] is not None,
                                                          reason="C++ extension not built")),
            pytest.param("triton", marks=pytest.mark.skipif(ak.available_backends(DEVICE)["triton"] is not None,
                                                             reason="Triton cannot run here"))]


def _eager(logits, labels):
    """eq. 1-2 by plain torch autograd (in the logits' dtype); ignored labels give 0 in both outputs."""
    log_p = torch.log_softmax(logits / TEMPERATURE, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    if labels is None:
        return None, entropy
    active = labels != -100
    logprobs = log_p.gather(-1, torch.where(active, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(active, logprobs, 0.0), torch.where(active, entropy, 0.0)


def _edit(out, kind, mask, factor):
    if kind == "masked_fill_":
        out.masked_fill_(~mask, 0.0)
    elif kind == "mul_":
        out.mul_(factor)
    elif kind == "add_":
        out.add_(5.0)  # the gradient is unchanged; a backward reading this tensor would see h + 5
    elif kind == "slice":
        out[:, 1:] *= 3.0
    return out


def _call(function, logits, labels, backend):
    if function == "logprobs_and_entropy":
        return ak.logprobs_and_entropy(logits, labels, temperature=TEMPERATURE, backend=backend)
    if function == "logprobs_from_logits":
        return ak.logprobs_from_logits(logits, labels, temperature=TEMPERATURE, backend=backend), None
    return None, ak.entropy_from_logits(logits, temperature=TEMPERATURE, backend=backend)


def _inputs(vocab=37):
    full = torch.randn(3, 6, vocab, device=DEVICE) * 3
    labels = torch.randint(0, vocab, (3, 5), device=DEVICE)
    labels[0, 2] = -100
    return full, labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("function", ["logprobs_and_entropy", "logprobs_from_logits", "entropy_from_logits"])
@pytest.mark.parametrize("kind", ["masked_fill_", "mul_", "add_", "slice"])
def test_outputs_can_be_edited_in_place(backend, function, kind):
    full, labels = _inputs()
    mask = torch.rand(3, 5, device=DEVICE) > 0.4
    factor = torch.rand(3, 5, device=DEVICE) + 0.5
    weights = (torch.randn(3, 5, device=DEVICE), torch.randn(3, 5, device=DEVICE))

    def loss_of(outputs):
        return sum((_edit(out, kind, mask, factor) * w).sum() for out, w in zip(outputs, weights) if out is not None)

    leaf = full.clone().requires_grad_()
    outputs = _call(function, leaf[:, :-1], labels, backend)  # a strided slice, as causal-LM losses pass
    for out in outputs:
        if out is not None:
            assert not out._is_view() and out.is_contiguous() and out.dtype == torch.float32
    loss = loss_of(outputs)
    loss.backward()
    uses_labels = function != "entropy_from_logits"
    results = {}
    for dtype in (torch.float32, torch.float64):
        eager_leaf = full.detach().to(dtype).clone().requires_grad_()
        eager_outputs = _eager(eager_leaf[:, :-1], labels if uses_labels else None)
        if function == "logprobs_from_logits":
            eager_outputs = (eager_outputs[0], None)
        elif function == "entropy_from_logits":
            eager_outputs = (None, eager_outputs[1])
        eager_loss = loss_of(eager_outputs)
        eager_loss.backward()
        results[dtype] = (eager_loss.detach(), eager_leaf.grad)
    exact_loss, exact_grad = results[torch.float64]
    eager_error = (results[torch.float32][1].double() - exact_grad).abs().max().item()
    # The accuracy rule: error against fp64 <= 3 x eager fp32's error + 1e-5.
    assert (leaf.grad.double() - exact_grad).abs().max().item() <= 3 * eager_error + 1e-5
    loss_error = (results[torch.float32][0].double() - exact_loss).abs().item()
    assert abs(loss.item() - exact_loss.item()) <= 3 * loss_error + 1e-5
    assert leaf.grad[:, -1].abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_entropy_survives_an_edit_of_the_output(backend):
    """The entropy's gradient needs h_t; the backward must use its own copy, not the returned tensor."""
    full, labels = _inputs()
    grads = []
    for edit in (False, True):
        leaf = full.clone().requires_grad_()
        _, entropy = ak.logprobs_and_entropy(leaf[:, :-1], labels, temperature=TEMPERATURE, backend=backend)
        weight = torch.linspace(-1, 1, entropy.numel(), device=DEVICE).view(entropy.shape)
        loss = (entropy * weight).sum()
        if edit:
            entropy.add_(5.0).mul_(0.0)  # after the loss was built: this loss's graph saw the original values
        loss.backward()
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True])
def test_non_mergeable_4d_logits_gradient_buffer(backend, inplace):
    """>= 4-d logits whose leading dims cannot be merged: as_rows3d copies and the buffer is copied back."""
    base = torch.randn(3, 2, 4, 23, device=DEVICE)
    labels = torch.randint(0, 23, (2, 3, 4), device=DEVICE)
    leaf = base.clone().requires_grad_()
    work = leaf.transpose(0, 1) * 1.0 if not inplace else (leaf * 1.0).transpose(0, 1)
    assert rows3d_needs_copy(work)
    logprobs, entropy = ak.logprobs_and_entropy(work, labels, temperature=TEMPERATURE, backend=backend,
                                                inplace_backward=inplace)
    (logprobs.sum() + 0.3 * entropy.sum()).backward()
    exact = base.double().requires_grad_()
    lp, h = _eager(exact.transpose(0, 1), labels)
    (lp.sum() + 0.3 * h.sum()).backward()
    torch.testing.assert_close(leaf.grad.double(), exact.grad, rtol=0, atol=1e-5)


@pytest.mark.skipif(ak.available_backends(DEVICE)["triton"] is not None, reason="Triton cannot run here")
@pytest.mark.parametrize("inplace", [False, True])
def test_single_pass_gradient_buffer_of_non_mergeable_4d_logits(inplace):
    """The single-pass loss writes its gradient through the same buffer helper (copied back once)."""
    base = torch.randn(3, 2, 2, 41, device=DEVICE)
    labels = torch.randint(0, 41, (2, 3, 2), device=DEVICE)
    token_response = torch.tensor([[[0, 0], [0, 1], [1, -1]], [[2, 2], [3, 3], [3, -1]]], device=DEVICE)
    extras = dict(token_response=token_response, response_group=torch.tensor([0, 0, 1, 1], device=DEVICE),
                  old_entropy=torch.rand(2, 3, 2, device=DEVICE), num_groups=2,
                  config=ak.AEMConfig(surprisal_source="old", temperature=TEMPERATURE, entropy_coef=0.1))
    advantages = torch.tensor([1.0, -0.5, 0.3, 0.8], device=DEVICE)
    grads = []
    for backend, single_pass in (("triton", True), ("torch", False)):
        leaf = base.clone().requires_grad_()
        work = (leaf * 1.0).transpose(0, 1)
        assert rows3d_needs_copy(work)
        loss, _ = ak.aem_policy_loss(work, labels, advantages, backend=backend, single_pass=single_pass,
                                     inplace_backward=inplace and single_pass, **extras)
        (2.0 * loss).backward()  # grad_output != 1: the backward rescales the buffer in place
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


# ---- torch.compile(fullgraph=True) x inplace_backward x backend -------------------------------------------

def _compile_case():
    n, vocab = 6, 29
    full = torch.randn(n, vocab + 3, device=DEVICE) * 2
    tensor = (lambda values: torch.tensor(values, device=DEVICE))  # noqa: E731
    batch = dict(labels=torch.randint(0, vocab, (n,), device=DEVICE), token_response=tensor([0, 0, 1, 1, -1, 2]),
                 response_group=tensor([0, 0, 1]), advantages=tensor([1.0, -0.5, 0.3]),
                 old_entropy=torch.rand(n, device=DEVICE), weights=torch.randn(n, device=DEVICE))
    return full[:, :vocab], batch


def _compare_compiled(step, inputs, compile_backend="aot_eager"):
    torch._dynamo.reset()
    eager_leaves = [x.clone().requires_grad_() for x in inputs]
    expected = step(*eager_leaves)
    sum(expected).backward()
    leaves = [x.clone().requires_grad_() for x in inputs]
    got = torch.compile(step, fullgraph=True, backend=compile_backend)(*leaves)
    sum(got).backward()
    for value, want in zip(got, expected):
        # inductor may reorder the final reductions of a few fp32 terms: a few ulps of the value
        torch.testing.assert_close(value, want, rtol=1e-6, atol=1e-6)
    for leaf, eager in zip(leaves, eager_leaves):
        torch.testing.assert_close(leaf.grad, eager.grad, rtol=1e-6, atol=1e-7)


def _token_ops_and_two_pass_loss(backend, inplace):
    logits, batch = _compile_case()
    labels, w = batch["labels"], batch["weights"]
    options = dict(temperature=TEMPERATURE, backend=backend, inplace_backward=inplace)

    top = torch.stack([labels, (labels + 1) % logits.shape[-1], labels], dim=-1)  # K = 3, one duplicate

    def step(a, b, c, d, e):
        # `* 1.0`: inplace_backward overwrites its logits, which must be a non-leaf (as an lm_head's output is)
        lp, h = ak.logprobs_and_entropy(a * 1.0, labels, **options)
        lp_top = ak.selective_log_softmax(e * 1.0, top, TEMPERATURE, backend=backend, inplace_backward=inplace)
        lp_only = ak.logprobs_from_logits(b * 1.0, labels, **options)
        h_only = ak.entropy_from_logits(c * 1.0, **options)
        loss, _ = ak.aem_policy_loss(d * 1.0, labels, batch["advantages"], token_response=batch["token_response"],
                                     response_group=batch["response_group"], num_groups=2, single_pass=False,
                                     config=ak.AEMConfig(temperature=TEMPERATURE), backend=backend,
                                     inplace_backward=inplace)
        return ((lp * w).sum() + (h * w).sum(), (lp_only * w).sum(), (h_only * w).sum(), loss,
                (lp_top * w[:, None]).sum())

    return step, [logits] * 5


# aot_eager runs Dynamo and AOT autograd (fake tensors, functionalisation of the in-place gradient, the backward
# trace where `_is_view` used to break the graph) at a fraction of inductor's compile time on 2 cores; one
# inductor case below covers the code generation around the custom ops.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True])
def test_torch_compile_fullgraph_matches_eager(backend, inplace):
    _compare_compiled(*_token_ops_and_two_pass_loss(backend, inplace))


@pytest.mark.skipif(ak.available_backends(DEVICE)["triton"] is not None, reason="Triton cannot run here")
def test_torch_compile_inductor_fullgraph_inplace_triton():
    _compare_compiled(*_token_ops_and_two_pass_loss("triton", True), compile_backend="inductor")


@pytest.mark.skipif(ak.available_backends(DEVICE)["triton"] is not None, reason="Triton cannot run here")
@pytest.mark.parametrize("inplace", [False, True])
def test_torch_compile_fullgraph_single_pass_loss(inplace):
    logits, batch = _compile_case()
    config = ak.AEMConfig(surprisal_source="old", temperature=TEMPERATURE, entropy_coef=0.01)

    def step(a):
        loss, _ = ak.aem_policy_loss(a * 1.0, batch["labels"], batch["advantages"],
                                     token_response=batch["token_response"], response_group=batch["response_group"],
                                     old_entropy=batch["old_entropy"], num_groups=2, single_pass=True,
                                     config=config, backend="triton", inplace_backward=inplace)
        return (loss,)

    _compare_compiled(step, [logits])
