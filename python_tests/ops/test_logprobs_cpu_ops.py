"""The C++ CPU ops as torch operators: their own input checks, parity of the user-facing validation with the
other backends, torch.library.opcheck (schema, fake tensors, autograd, AOT dispatch), torch.compile, the
instruction-set switch, and the fallback to the torch reference when the extension is disabled."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import aem_kernels as ak
from helpers import CPP_BUILT, CPP_REASON, REPO_ROOT
from aem_kernels import capability
from aem_kernels.ops.logprobs import cpu as cpu_backend

pytestmark = pytest.mark.skipif(not CPP_BUILT, reason=CPP_REASON)
OPS = torch.ops.aem_kernels if (capability.cpu_extension() is not None) else None
ROOT = REPO_ROOT


def _inputs(shape=(2, 5, 37)):
    x = torch.randn(shape)
    labels = torch.randint(0, shape[-1], (shape[0] * shape[1],))
    return x, labels


# ---- checks inside C++ (what a direct torch.ops caller sees) -------------------------------------------------

@pytest.mark.parametrize("make, error, match", [
    (lambda x, y: (x[0], y[:5]), RuntimeError, "logits must be 3-d"),
    (lambda x, y: (x.transpose(1, 2).contiguous().transpose(1, 2), y), RuntimeError, "unit stride"),
    (lambda x, y: (x.int(), y), TypeError, "logits must be float32, bfloat16, float16 or float64"),
    (lambda x, y: (x, y.float()), TypeError, "labels must be an integer tensor"),
    (lambda x, y: (x, y[:-1]), RuntimeError, r"labels must have shape \[10\]"),
    (lambda x, y: (x, y.index_fill(0, torch.tensor([3]), 37)), RuntimeError, r"labels\[3\] = 37"),
    (lambda x, y: (x, y.index_fill(0, torch.tensor([4]), -1)), RuntimeError, r"labels must lie in \[0, 37\)"),
])
def test_forward_op_checks_its_inputs(make, error, match):
    x, y = make(*_inputs())
    with pytest.raises(error, match=match):
        OPS.logprobs_entropy_fwd(x, y, 1.0, -100)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan")])
def test_ops_check_temperature(temperature):
    x, y = _inputs()
    with pytest.raises(RuntimeError, match="temperature must be a finite float > 0"):
        OPS.logprobs_entropy_fwd(x, y, temperature, -100)
    with pytest.raises(RuntimeError, match="temperature must be a finite float > 0"):
        OPS.logprobs_entropy_bwd(x, y, torch.zeros(10, 2), torch.zeros(10), None, None, temperature, -100)


def test_backward_op_checks_its_inputs():
    x, y = _inputs()
    _, h, state = OPS.logprobs_entropy_fwd(x, y, 1.0, -100)
    grad = torch.ones(10)
    with pytest.raises(RuntimeError, match="grad_out must have the logits' shape"):
        OPS.logprobs_entropy_bwd_(x, y, state, h, grad, None, 1.0, -100, torch.empty(2, 5, 36))
    with pytest.raises(TypeError, match="grad_out must have the logits' dtype"):
        OPS.logprobs_entropy_bwd_(x, y, state, h, grad, None, 1.0, -100, torch.empty(2, 5, 37, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"state must be the \[10, 2\] state the forward returned"):
        OPS.logprobs_entropy_bwd(x, y, state[:-1], h, grad, None, 1.0, -100)
    with pytest.raises(RuntimeError, match=r"state must be the \[10, 2\] state"):  # a per-row lse is not a state
        OPS.logprobs_entropy_bwd(x, y, state[:, 0], h, grad, None, 1.0, -100)
    with pytest.raises(TypeError, match="state must be a floating-point tensor"):
        OPS.logprobs_entropy_bwd(x, y, state.long(), h, grad, None, 1.0, -100)
    with pytest.raises(TypeError, match="grad_entropy must be a floating-point tensor"):
        OPS.logprobs_entropy_bwd(x, y, state, h, grad, torch.ones(10, dtype=torch.long), 1.0, -100)
    storage = torch.randn(2, 6, 37)
    with pytest.raises(RuntimeError, match="partial overlap"):  # the gradient shifted by one row
        OPS.logprobs_entropy_bwd_(storage[:, :-1], y, state, h, grad, None, 1.0, -100, storage[:, 1:])


def test_segment_sum_op_checks_its_inputs():
    with pytest.raises(RuntimeError, match=r"segment_ids must lie in \[-1, 3\); segment_ids\[1\] = 3"):
        OPS.segment_sum(torch.ones(3), torch.tensor([0, 3, 1]), 3)
    with pytest.raises(TypeError, match="segment_ids must be an integer tensor"):
        OPS.segment_sum(torch.ones(3), torch.ones(3), 3)
    with pytest.raises(RuntimeError, match="one id per value"):
        OPS.segment_sum(torch.ones(3), torch.zeros(2, dtype=torch.long), 3)


# ---- the user-facing validation is the same for every backend -------------------------------------------------

@pytest.mark.parametrize("case", ["label_range", "float_labels", "label_shape", "temperature", "stride", "dtype"])
def test_validation_errors_match_torch_backend(case):
    x = torch.randn(2, 4, 11)
    y = torch.randint(0, 11, (2, 4))
    kwargs = {}
    if case == "label_range":
        y[1, 2] = 11
    elif case == "float_labels":
        y = y.float()
    elif case == "label_shape":
        y = y[:, :3]
    elif case == "temperature":
        kwargs["temperature"] = 0.0
    elif case == "stride":
        x = torch.randn(2, 11, 4).transpose(1, 2)
    elif case == "dtype":
        x = x.long()
    errors = []
    for backend in ("cpu", "torch"):
        with pytest.raises((ValueError, TypeError)) as info:
            ak.logprobs_and_entropy(x, y, backend=backend, **kwargs)
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[1]


# ---- torch.library / torch.compile -------------------------------------------------------------------------

def test_opcheck_all_ops():
    x, y = _inputs((2, 3, 41))
    _, h, state = OPS.logprobs_entropy_fwd(x, y, 0.7, -100)
    a, b = torch.randn(6), torch.randn(6)
    cases = [
        (OPS.logprobs_entropy_fwd.default, (x.clone().requires_grad_(), y, 0.7, -100)),
        (OPS.logprobs_entropy_fwd.default, (x.clone().requires_grad_(), None, 1.3, -100)),
        (OPS.logprobs_entropy_bwd.default, (x, y, state, h, a, b, 0.7, -100)),
        (OPS.logprobs_entropy_bwd_.default, (x, y, state, h, a, None, 0.7, -100, torch.empty_like(x))),
        (OPS.segment_sum.default, (torch.randn(30, requires_grad=True), torch.randint(-1, 4, (30,)), 4)),
    ]
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


def test_raw_forward_op_gradient_matches_reference():
    """The op's registered autograd formula; the state output is what the backward consumes and carries no
    gradient."""
    x = torch.randn(2, 3, 29, dtype=torch.float64)
    y = torch.tensor([0, 5, -100, 7, 28, 1])
    leaf = x.clone().requires_grad_()
    lp, h, state = OPS.logprobs_entropy_fwd(leaf, y, 0.6, -100)
    assert lp.requires_grad and h.requires_grad and not state.requires_grad
    (lp.sum() + 2 * h.sum()).backward()
    exact = x.clone().requires_grad_()
    z = exact / 0.6
    logp = z.log_softmax(-1).view(6, 29)
    active = y != -100
    lp_x = torch.where(active, logp.gather(1, y.clamp(min=0)[:, None])[:, 0], 0.0)
    h_x = torch.where(active, -(logp.exp() * logp).sum(-1), 0.0)
    (lp_x.sum() + 2 * h_x.sum()).backward()
    assert torch.allclose(leaf.grad, exact.grad, atol=1e-12)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_traces_the_cpu_ops(compile_backend):
    torch._dynamo.reset()
    x, _ = _inputs((2, 7, 301))
    y = torch.randint(0, 301, (2, 7))
    w = torch.randn(2, 7)

    def loss_fn(logits, labels):
        lp, h = ak.logprobs_and_entropy(logits, labels, temperature=0.8, backend="cpu")
        return (lp * w).sum() + (h * w).sum()

    eager = x.clone().requires_grad_()
    expected = loss_fn(eager, y)
    expected.backward()
    compiled = x.clone().requires_grad_()
    # fullgraph: the ops trace through their fake implementations, no graph break back to eager
    got = torch.compile(loss_fn, backend=compile_backend, fullgraph=True)(compiled, y)
    got.backward()
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-5)  # inductor may reorder the final sums
    assert torch.equal(compiled.grad, eager.grad)


# ---- instruction set and fallback (fresh interpreters) -----------------------------------------------------

def _python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": ROOT, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_kernel_isa_follows_torch_cpu_capability():
    expected = "avx2" if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else "baseline"
    assert cpu_backend.kernel_isa() == expected
    proc = _python("from aem_kernels.ops.logprobs import cpu; print(cpu.kernel_isa())", ATEN_CPU_CAPABILITY="default")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "baseline"


def test_fallback_when_extension_disabled():
    proc = _python("""
        import warnings, torch, aem_kernels as ak
        x = torch.randn(3, 5, 40); y = torch.randint(0, 40, (3, 5))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reasons = ak.available_backends("cpu")         # asking never warns
            assert caught == [], [str(w.message) for w in caught]
            assert "AEM_KERNELS_DISABLE_CPU_EXT=1" in reasons["cpu"] and reasons["torch"] is None
            lp, h = ak.logprobs_and_entropy(x, y)          # auto: falls back to the torch backend, warns
            ak.entropy_from_logits(x)                      # warned once only
            ak.available_backends("cpu")
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 1 and "AEM_KERNELS_DISABLE_CPU_EXT=1" in messages[0], messages
        lp_ref, h_ref = ak.logprobs_and_entropy(x, y, backend="torch")
        assert torch.equal(lp, lp_ref) and torch.equal(h, h_ref)
        assert not hasattr(torch.ops.aem_kernels, "logprobs_entropy_fwd")
        try:
            ak.logprobs_and_entropy(x, y, backend="cpu")
        except ak.BackendUnavailableError as exc:
            assert "AEM_KERNELS_DISABLE_CPU_EXT=1" in str(exc)
        else:
            raise AssertionError("backend='cpu' must raise when the extension is disabled")
        print("ok")
    """, AEM_KERNELS_DISABLE_CPU_EXT="1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
