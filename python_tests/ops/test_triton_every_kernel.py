"""Every Triton kernel of the package, each launched on tiny shapes (in the interpreter without a GPU) and
checked against the fp64 oracle under the accuracy rule (|ours - fp64| <= 3 |eager fp32 - fp64| + 1e-5).

A spy on each kernel's launch records which kernels a test really ran, and `COVERED` (kernel -> test) must
name every Triton kernel the package defines, so a new kernel cannot go unlisted. This file, the sm_90 compile
tests and test_versions.py are the second leg of `make test`: the same checks under the oldest supported
Triton (3.6, the lent H200's), whose interpreter and compiler differ from the newest one's.
"""

import contextlib
import importlib
import pkgutil

import pytest
import torch
import triton

import aem_kernels as ak
import aem_kernels.ops
from fused_linear_checks import assert_rule, check_against_rule, linear_inputs
from helpers import DEVICE, oracle_logprobs_entropy

pytest.importorskip("triton")
from aem_kernels.ops.segment import naive as segment_naive  # noqa: E402
from aem_kernels.ops.segment import triton as segment_triton  # noqa: E402

# The interpreter evaluates both branches of tl.where in numpy: log(0) and 0 * inf there are expected.
pytestmark = [pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]

COVERED = {
    "_logprobs_entropy_fwd_kernel": "test_token_row_kernels",
    "_logprobs_entropy_bwd_kernel": "test_token_row_kernels",
    "_aem_loss_fused_kernel": "test_policy_loss_single_pass_kernels",
    "_scale_rows_kernel": "test_policy_loss_single_pass_kernels",
    "_segment_sum_kernel": "test_segment_kernel",
    "_fused_linear_fwd_kernel": "test_fused_linear_tile_kernels",
    "_fused_linear_bwd_atomic_kernel": "test_fused_linear_tile_kernels",
    "_fused_linear_bwd_dx_kernel": "test_fused_linear_tile_kernels",
    "_fused_linear_bwd_dw_kernel": "test_fused_linear_tile_kernels",
}


def _triton_modules():
    """The `triton` backend module of every op package under aem_kernels.ops."""
    for info in pkgutil.iter_modules(aem_kernels.ops.__path__):
        if info.ispkg:
            try:
                yield importlib.import_module(f"aem_kernels.ops.{info.name}.triton")
            except ModuleNotFoundError:
                continue


def _kernels():
    """{name: (module, kernel)} of every launchable Triton kernel (a jit function named *_kernel)."""
    return {name: (module, value) for module in _triton_modules() for name, value in vars(module).items()
            if name.endswith("_kernel") and hasattr(value, "__getitem__") and hasattr(value, "fn")}


@contextlib.contextmanager
def _launches():
    """The set of kernel names launched inside the block (each module's kernel replaced by a recording proxy;
    the launchers look their kernels up at call time)."""
    seen = set()

    class Spy:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            seen.add(self.name)
            return self.kernel[grid]

    kernels = _kernels()
    with pytest.MonkeyPatch.context() as patch:
        for name, (module, kernel) in kernels.items():
            patch.setattr(module, name, Spy(name, kernel))
        # autotuned launchers (triton.autotune over a kernel) hold their kernel since import: spy on them too
        for module in {module for module, _ in kernels.values()}:
            for attr, value in list(vars(module).items()):
                inner = getattr(value, "fn", None)
                if isinstance(value, triton.runtime.Autotuner) and getattr(inner, "__name__", None) in kernels:
                    patch.setattr(module, attr, Spy(inner.__name__, value))
        yield seen


def test_the_list_names_every_kernel():
    assert set(_kernels()) == set(COVERED)
    assert all(name in globals() for name in COVERED.values())


def test_token_row_kernels():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 200, generator=gen) * 3  # 2 tiles of the interpreter's 128 columns, the last partial
    labels = torch.randint(0, 200, (5,), generator=gen)
    labels[2] = -100
    ga, gb = torch.randn(5, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)

    def run(x, backend):
        leaf = x.detach().requires_grad_()
        if backend is None:
            lp, ent = oracle_logprobs_entropy(leaf, labels, temperature=0.7)
        else:
            lp, ent = ak.logprobs_and_entropy(leaf.to(DEVICE), labels.to(DEVICE), temperature=0.7, backend=backend)
        (grad,) = torch.autograd.grad((lp.double().cpu() * ga).sum() + (ent.double().cpu() * gb).sum(), leaf)
        return lp.cpu(), ent.cpu(), grad

    with _launches() as seen:
        ours = run(logits, "triton")
    assert seen == {"_logprobs_entropy_fwd_kernel", "_logprobs_entropy_bwd_kernel"}
    # eager fp32 (the rule's baseline) computes in fp32; the oracle's fp64 is the truth
    eager = run(logits, "torch")
    truth = run(logits.double(), None)
    for name, a, e, t in zip(("logprobs", "entropy", "gradient"), ours, eager, truth):
        assert_rule(name, a, e, t)


def test_policy_loss_single_pass_kernels():
    gen = torch.Generator().manual_seed(2)
    n, vocab = 8, 200
    logits = torch.randn(n, vocab, generator=gen) * 2
    labels = torch.randint(0, vocab, (n,), generator=gen)
    extras = dict(token_response=torch.tensor([0, 0, 0, 1, 1, -1, 2, 2]), response_group=torch.tensor([0, 0, 1]),
                  old_logprobs=-torch.rand(n, generator=gen) * 5, old_entropy=torch.rand(n, generator=gen) * 3)
    advantages = torch.tensor([1.0, -0.8, 0.5])
    config = ak.AEMConfig(surprisal_source="old", kl_coef=0.0, entropy_coef=0.01)

    def run(x, backend, single_pass):
        leaf = x.detach().to(DEVICE).requires_grad_()
        moved = {k: v.to(DEVICE) for k, v in extras.items()}
        loss, _ = ak.aem_policy_loss(leaf, labels.to(DEVICE), advantages.to(DEVICE), config=config,
                                     backend=backend, single_pass=single_pass, **moved)
        (loss * 3.0).backward()  # grad_output != 1: the gradient rows are rescaled by a second kernel
        return loss.detach().cpu(), leaf.grad.cpu()

    with _launches() as seen:
        ours = run(logits, "triton", True)
    assert seen == {"_aem_loss_fused_kernel", "_scale_rows_kernel"}
    eager = run(logits, "torch", False)
    truth = run(logits.double(), "torch", False)
    for name, a, e, t in zip(("loss", "gradient"), ours, eager, truth):
        assert_rule(name, a, e, t)


def test_segment_kernel():
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(2, 300, generator=gen, requires_grad=True)  # > 2 chunks of BLOCK_N = 128 per segment
    ids = torch.randint(-1, 3, (2, 300), generator=gen)
    with _launches() as seen:
        first, second = segment_triton.segment_sums_deterministic([values.detach(), values.detach() * 2], ids, 3)
        (grad,) = torch.autograd.grad(segment_triton.segment_sum(values, ids, 3).sum(), values)
    assert seen == {"_segment_sum_kernel"}
    exact = segment_naive.segment_sum_ref(values.detach().double(), ids, 3)
    # fp32 accumulation of 300 values: within 300 fp32 roundings of sum |v|
    bound = 300 * 2.0 ** -23 * values.detach().double().abs().sum()
    assert (first.double() - exact).abs().max() <= bound
    assert (second.double() - 2 * exact).abs().max() <= 2 * bound
    assert torch.equal(grad, (ids >= 0).float())


@pytest.mark.parametrize("deterministic", [False, True])
def test_fused_linear_tile_kernels(deterministic):
    x, w, b, labels, ga, gb = linear_inputs(shape=(9,), hidden=20, vocab=70, ignore=(4,))
    with _launches() as seen:
        check_against_rule("triton", x, w, b, labels, ga, gb, temperature=0.9, deterministic=deterministic)
    backward = {"_fused_linear_bwd_dx_kernel", "_fused_linear_bwd_dw_kernel"} if deterministic else {
        "_fused_linear_bwd_atomic_kernel"}
    assert seen == {"_fused_linear_fwd_kernel"} | backward
