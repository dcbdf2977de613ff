"""Triton log-prob / entropy kernels (aem_kernels/ops/logprobs.py) against the fp64 reference.

Without a GPU they run in Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1), with the
tile capped at INTERPRET_MAX_BLOCK_V = 128 columns: V = 300 is three tiles, the last one partial. The
interpreter costs ~20 ms per row and tile, so shapes are a few dozen rows.
"""

import os
import subprocess
import sys

import pytest
import torch

import aem_kernels as ak
from aem_kernels.ops.segment.naive import segment_sum_ref
from helpers import REPO_ROOT, reference_backward, reference_forward
from helpers import DEVICE

triton = pytest.importorskip("triton")
from aem_kernels.ops.logprobs import triton as tl_ops  # noqa: E402
from aem_kernels.ops import utils as tl_utils  # noqa: E402
from aem_kernels.ops.segment.triton import segment_sums_deterministic  # noqa: E402

IGNORE = -100
# The interpreter evaluates both branches of tl.where in numpy: log(0) and 0 * inf there are expected.
pytestmark = [pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]


def _batch(b=3, t=5, v=300, scale=3.0, dtype=torch.float32, ignore=(2, 9), neg_inf=True):
    """Non-contiguous [b, t, v] rows (logits[:, :-1] of a [b, t+1, v] tensor), labels [b*t] with ignored rows,
    some -inf entries (never at a label: a -inf target has log-prob -inf, tested separately)."""
    full = torch.randn(b, t + 1, v, device=DEVICE) * scale
    labels = torch.randint(0, v, (b * t,), device=DEVICE)
    if neg_inf:
        full[0, 1, :v // 2] = float("-inf")
        full[1, 3, 7] = float("-inf")
        labels[1] = v - 1
        labels[1 * t + 3] = 8
    labels[list(ignore)] = IGNORE
    return full.to(dtype)[:, :-1], labels




def test_forward_matches_fp64_reference():
    logits3d, labels = _batch()
    assert not logits3d.is_contiguous()
    lp, h, state = tl_ops.logprobs_entropy_fwd(logits3d, labels, 0.7, IGNORE)
    lp_ref, h_ref, state_ref = reference_forward(logits3d, labels, 0.7)
    assert lp.dtype == h.dtype == state.dtype == torch.float32 and state.shape == (labels.numel(), 2)
    active = labels != IGNORE
    # fp32 outputs of an fp64 row epilogue on O(10) values: within an ulp or two (measured ~5e-7).
    torch.testing.assert_close(lp.double(), lp_ref, rtol=2e-7, atol=1e-6)
    torch.testing.assert_close(h.double(), h_ref, rtol=2e-7, atol=1e-6)
    # state = (row max of the logits: exact, log d: fp32 of an fp32 sum), zero on ignored rows
    assert torch.equal(state[active, 0], logits3d.reshape(-1, logits3d.shape[-1])[active].amax(-1))
    # the oracle gives lse of logits / tau; the state folds into it as m / tau + log d
    lse = state[active, 0].double() / 0.7 + state[active, 1].double()
    torch.testing.assert_close(lse, state_ref[active], rtol=1e-6, atol=1e-6)
    assert (lp[~active] == 0).all() and (h[~active] == 0).all() and (state[~active] == 0).all()


@pytest.mark.parametrize("grads", ["both", "logprobs", "entropy"])
@pytest.mark.parametrize("inplace", [False, True])
def test_backward_matches_fp64_reference(grads, inplace):
    logits3d, labels = _batch()
    n = labels.numel()
    grad_lp = torch.randn(n, device=DEVICE) if grads != "entropy" else None
    grad_h = torch.randn(n, device=DEVICE) if grads != "logprobs" else None
    expected = reference_backward(logits3d, labels, 0.7, grad_lp, grad_h)
    _, h, state = tl_ops.logprobs_entropy_fwd(logits3d, labels, 0.7, IGNORE)
    source = logits3d
    if inplace:  # a private copy with the same non-contiguous layout, overwritten by its own gradient
        source = torch.empty(logits3d.shape[0], logits3d.shape[1] + 1, logits3d.shape[2], device=DEVICE)[:, :-1]
        source.copy_(logits3d)
    out = source if inplace else torch.empty_like(logits3d)
    result = tl_ops.logprobs_entropy_bwd(source, labels, state, h, grad_lp, grad_h, 0.7, IGNORE, out)
    assert result.data_ptr() == out.data_ptr()
    # fp32 gradient entries of size <= |a| + |b| log V ~ 10: measured max error ~1e-6.
    torch.testing.assert_close(result.double(), expected, rtol=1e-5, atol=1e-5)
    assert (result.reshape(-1, result.shape[-1])[labels == IGNORE] == 0).all()


def test_large_magnitudes_keep_precision():
    """|z| ~ 1e4 with an O(1) spread: the naive h = lse - E_p[z] would cancel two 1e4 numbers in fp32 (error
    ~1e-3); the shifted form keeps entropy and log-probs at ~1e-6."""
    v = 300
    base = torch.tensor([1e4, -1e4, 0.0, 1e4], device=DEVICE).view(1, 4, 1)
    logits3d = base + torch.randn(1, 4, v, device=DEVICE)
    logits3d[0, 3] = torch.randn(v, device=DEVICE) * 1e4  # spread 1e4: a near one-hot row
    labels = torch.randint(0, v, (4,), device=DEVICE)
    lp, h, state = tl_ops.logprobs_entropy_fwd(logits3d, labels, 1.0, IGNORE)
    lp_ref, h_ref, state_ref = reference_forward(logits3d, labels, 1.0)
    torch.testing.assert_close(h.double(), h_ref, rtol=0, atol=2e-6)
    torch.testing.assert_close(lp.double(), lp_ref, rtol=1e-6, atol=2e-6)
    assert torch.equal(state[:, 0], logits3d[0].amax(-1))  # the row max itself, not an fp32 lse of size 1e4
    grad = torch.empty_like(logits3d)
    a, b = torch.randn(4, device=DEVICE), torch.randn(4, device=DEVICE)
    tl_ops.logprobs_entropy_bwd(logits3d, labels, state, h, a, b, 1.0, IGNORE, grad)
    expected = reference_backward(logits3d, labels, 1.0, a, b)
    # log p = (x - m) / tau - log d is exact near the max, so p has no ulp(lse) error (an fp32 lse of 1e4 would
    # put exp(4.9e-4) - 1 on every entry); measured max error ~3e-7 on entries <= |a| + |b| (log V + 1).
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad.double(), expected, rtol=0, atol=2e-6)


def test_neg_inf_rows_and_targets():
    v = 200
    logits3d = torch.randn(1, 3, v, device=DEVICE)
    logits3d[0, 0, 1:] = float("-inf")           # a one-hot distribution: entropy 0, log-prob 0
    logits3d[0, 1, 5] = float("-inf")            # target at -inf: log-prob -inf, like the reference
    logits3d[0, 2] = float("-inf")               # no distribution at all: NaN, like the reference
    labels = torch.tensor([0, 5, 3], device=DEVICE)
    lp, h, state = tl_ops.logprobs_entropy_fwd(logits3d, labels, 1.0, IGNORE)
    assert lp[0] == 0 and h[0] == 0
    assert lp[1] == float("-inf") and torch.isfinite(h[1])
    assert torch.isnan(lp[2]) and torch.isnan(h[2])
    _, h_ref, _ = reference_forward(logits3d, labels, 1.0)
    torch.testing.assert_close(h[:2].double(), h_ref[:2], rtol=1e-5, atol=1e-6)
    grad = torch.empty_like(logits3d)
    tl_ops.logprobs_entropy_bwd(logits3d[:, :1], labels[:1], state[:1], h[:1], torch.ones(1), torch.ones(1), 1.0,
                                IGNORE, grad[:, :1])
    assert (grad[0, 0] == 0).all()  # one-hot: p = onehot, so a (onehot - p) = 0 and p log p terms vanish


def test_all_rows_ignored_reads_nothing_and_zeroes_gradient():
    logits3d = torch.randn(2, 3, 150, device=DEVICE)
    labels = torch.full((6,), IGNORE, device=DEVICE)
    lp, h, state = tl_ops.logprobs_entropy_fwd(logits3d, labels, 1.0, IGNORE)
    assert (lp == 0).all() and (h == 0).all() and (state == 0).all()
    tl_ops.logprobs_entropy_bwd(logits3d, labels, state, h, torch.randn(6), torch.randn(6), 1.0, IGNORE, logits3d)
    assert (logits3d == 0).all()  # in place: every row's gradient is 0


@pytest.mark.parametrize("rows,vocab", [(1, 1), (1, 300), (3, 7), (2, 128)])
def test_one_token_tiny_and_exact_tile_vocabularies(rows, vocab):
    logits3d = torch.randn(1, rows, vocab, device=DEVICE)
    labels = torch.randint(0, vocab, (rows,), device=DEVICE)
    lp, h, state = tl_ops.logprobs_entropy_fwd(logits3d, labels, 1.3, IGNORE)
    lp_ref, h_ref, _ = reference_forward(logits3d, labels, 1.3)
    torch.testing.assert_close(lp.double(), lp_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.double(), h_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    """bf16/fp16 logits are read as they are and computed in fp32. Compared with fp64 on the same rounded
    inputs, the outputs are fp32-accurate (measured: log-prob/entropy error ~1e-6); the gradient is rounded
    to the logits' dtype once: at most half an ulp, 2^-8 (bf16) / 2^-11 (fp16) of each entry (measured max
    errors: 3.2e-3 bf16 and 2.4e-4 fp16 on entries of size ~1-2)."""
    logits3d, labels = _batch(b=2, t=4, dtype=dtype, ignore=(3,), neg_inf=False)
    lp, h, state = tl_ops.logprobs_entropy_fwd(logits3d, labels, 0.9, IGNORE)
    lp_ref, h_ref, _ = reference_forward(logits3d, labels, 0.9)
    torch.testing.assert_close(lp.double(), lp_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.double(), h_ref, rtol=1e-5, atol=1e-5)
    a, b = torch.randn(8, device=DEVICE), torch.randn(8, device=DEVICE)
    grad = torch.empty_like(logits3d)
    tl_ops.logprobs_entropy_bwd(logits3d, labels, state, h, a, b, 0.9, IGNORE, grad)
    assert grad.dtype == dtype
    expected = reference_backward(logits3d, labels, 0.9, a, b)
    half_ulp = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    err = (grad.double() - expected).abs()
    assert (err <= half_ulp * expected.abs() + 1e-6).all(), f"max error {err.max().item():.3g}"


def test_fp64_logits_are_refused_and_auto_routes_them():
    """The kernels compute in fp32, so fp64 logits are not theirs: the launchers and backend="triton" refuse
    them with the reason, and "auto" sends them to a backend that computes in fp64 (no silent fallback)."""
    logits3d, labels = _batch(b=1, t=3, v=50, dtype=torch.float64, ignore=(1,), neg_inf=False)
    with pytest.raises(ak.BackendUnavailableError, match="compute in fp32.*backend=\"auto\""):
        tl_ops.logprobs_entropy_fwd(logits3d, labels, 1.0, IGNORE)
    state, per_row = torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ak.BackendUnavailableError, match="fp64"):
        tl_ops.logprobs_entropy_bwd(logits3d, labels, state, per_row, per_row, None, 1.0, IGNORE,
                                    torch.empty_like(logits3d))
    with pytest.raises(ak.BackendUnavailableError, match='backend="triton".*fp64'):
        ak.logprobs_and_entropy(logits3d, labels.view(1, 3), backend="triton")
    assert "fp64" in ak.available_backends(DEVICE, torch.float64)["triton"]
    assert ak.available_backends(DEVICE, torch.float32)["triton"] is None
    lp, h = ak.logprobs_and_entropy(logits3d, labels.view(1, 3))  # auto: C++ (CPU tensors) or torch (CUDA)
    assert lp.dtype == torch.float64
    lp_ref, h_ref, _ = reference_forward(logits3d, labels, 1.0)
    torch.testing.assert_close(lp.view(-1), lp_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(h.view(-1), h_ref, rtol=0, atol=1e-12)


def test_public_api_autograd_on_triton():
    full = torch.randn(2, 6, 300, device=DEVICE)
    labels = torch.randint(0, 300, (2, 5), device=DEVICE)
    labels[1, 2] = IGNORE
    weights = torch.randn(2, 5, device=DEVICE), torch.randn(2, 5, device=DEVICE)
    grads = {}
    for backend, dtype in (("triton", torch.float32), ("torch", torch.float64)):
        x = full.detach().to(dtype).requires_grad_()
        lp, h = ak.logprobs_and_entropy(x[:, :-1], labels, temperature=1.1, backend=backend)
        ((lp * weights[0]).sum() + (h * weights[1]).sum()).backward()
        grads[backend] = (lp, h, x.grad)
    for mine, theirs in zip(grads["triton"], grads["torch"]):
        torch.testing.assert_close(mine.double(), theirs, rtol=1e-5, atol=1e-5)
    # Entropy alone (no labels): every row is active, the backward carries only the entropy term.
    entropies, grads = [], []
    for backend, dtype in (("triton", torch.float32), ("torch", torch.float64)):
        x = full.detach().to(dtype).requires_grad_()
        h_only = ak.entropy_from_logits(x, backend=backend, temperature=0.5)
        (h_only * weights[0].sum()).sum().backward()
        entropies.append(h_only.double())
        grads.append(x.grad.double())
    torch.testing.assert_close(entropies[0], entropies[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)


def test_deterministic_sums_depend_only_on_each_response_tokens():
    """The fixed-order reduction gives bit-identical sums whatever the interleaving of other responses'
    tokens (the property scheduling-independent reproducibility needs); atomics promise only closeness."""
    n, responses = 600, 7
    ids = torch.randint(-1, responses, (n,), device=DEVICE)
    values = (torch.randn(n, device=DEVICE) * 1e3, torch.rand(n, device=DEVICE))
    first, second = segment_sums_deterministic(values, ids, responses)
    torch.testing.assert_close(first.double(), segment_sum_ref(values[0].double(), ids, responses), rtol=1e-6,
                               atol=1e-3)
    # Interleave differently while keeping each response's own order: a stable sort by a random key per id.
    key = torch.rand(responses + 1, device=DEVICE)[ids + 1]
    perm = torch.sort(key, stable=True).indices
    shuffled = segment_sums_deterministic((values[0][perm], values[1][perm]), ids[perm], responses)
    assert torch.equal(shuffled[0], first) and torch.equal(shuffled[1], second)


def test_launcher_errors():
    logits3d, labels = _batch(b=1, t=2, v=20, neg_inf=False, ignore=())
    row = torch.zeros(2)
    with pytest.raises(ValueError, match="logits3d"):
        tl_ops.logprobs_entropy_fwd(logits3d[0], labels, 1.0, IGNORE)
    with pytest.raises(ValueError, match="labels must have 2 entries"):
        tl_ops.logprobs_entropy_fwd(logits3d, labels[:1], 1.0, IGNORE)
    with pytest.raises(ValueError, match="labels is on meta"):
        tl_ops.logprobs_entropy_fwd(logits3d, labels.to("meta"), 1.0, IGNORE)
    state = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="grad_out3d"):
        tl_ops.logprobs_entropy_bwd(logits3d, labels, state, row, None, None, 1.0, IGNORE, torch.empty(1, 2, 19))
    for bad in (row, torch.zeros(3, 2), torch.zeros(2, 2, device="meta")):  # an lse-like [N] vector is rejected
        with pytest.raises(ValueError, match=r"state must be the \[2, 2\] tensor"):
            tl_ops.logprobs_entropy_bwd(logits3d, labels, bad, row, None, None, 1.0, IGNORE,
                                        torch.empty_like(logits3d))
    for name in ("entropy", "grad_logprobs", "grad_entropy"):
        args = dict(entropy=row, grad_logprobs=row, grad_entropy=row)
        args[name] = torch.zeros(5)
        with pytest.raises(ValueError, match=f"{name} must have 2 entries"):
            tl_ops.logprobs_entropy_bwd(logits3d, labels, state, temperature=1.0, ignore_index=IGNORE,
                                        grad_out3d=torch.empty_like(logits3d), **args)


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    code = ("import torch, aem_kernels as ak\n"
            "try:\n"
            "    ak.logprobs_from_logits(torch.randn(2, 5), torch.tensor([1, 2]), backend='triton')\n"
            "except ak.BackendUnavailableError as e:\n"
            "    print('ERR', e)\n"
            "from aem_kernels.ops.logprobs import triton as L\n"
            "try:\n"
            "    L.logprobs_entropy_fwd(torch.randn(1, 2, 5), None, 1.0, -100)\n"
            "except ak.BackendUnavailableError as e:\n"
            "    print('ERR', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = REPO_ROOT
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=root)
    lines = [line for line in out.stdout.splitlines() if line.startswith("ERR")]
    assert len(lines) == 2, out.stdout + out.stderr
    assert all("CUDA" in line and "TRITON_INTERPRET=1" in line for line in lines)


def test_launch_table_for_gpus(monkeypatch):
    monkeypatch.setattr(tl_utils, "is_interpreting", lambda: False)
    assert tl_utils.launch_config(151936, 2) == (8192, 8)   # 16 KB bf16 tiles (forward)
    assert tl_utils.launch_config(151936, 4) == (4096, 8)   # 16 KB fp32 tiles (forward)
    assert tl_utils.launch_config(151936, 2, tl_utils.BWD_TILE_BYTES) == (4096, 8)  # 8 KB gradient tiles
    assert tl_utils.launch_config(1000, 2) == (1024, 2)     # one tile per row
    assert tl_utils.launch_config(7, 4) == (8, 1)


def test_custom_ops_fake_shapes_and_opcheck():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        logits = torch.empty(2, 3, 1000, dtype=torch.bfloat16)
        lp, h, state = torch.ops.aem_kernels.triton_logprobs_entropy_fwd(logits, torch.zeros(6, dtype=torch.long),
                                                                         1.0, IGNORE)
        assert lp.shape == h.shape == (6,) and state.shape == (6, 2) and state.dtype == lp.dtype == torch.float32
        out = torch.ops.aem_kernels.triton_logprobs_entropy_fwd(logits, None, 1.0, IGNORE)
        assert out[0].shape == (0,) and out[2].shape == (6, 2)
    logits = torch.randn(1, 2, 16, device=DEVICE)
    labels = torch.tensor([3, IGNORE], device=DEVICE)
    torch.library.opcheck(torch.ops.aem_kernels.triton_logprobs_entropy_fwd.default, (logits, labels, 1.0, IGNORE),
                          test_utils=("test_schema", "test_faketensor"))
    _, h, state = tl_ops.logprobs_entropy_fwd(logits, labels, 1.0, IGNORE)
    args = (logits, labels, state, h, torch.ones(2), None, 1.0, IGNORE, torch.empty_like(logits))
    torch.library.opcheck(torch.ops.aem_kernels.triton_logprobs_entropy_bwd.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph():
    """No graph break: the kernels are opaque custom ops with fake implementations (aot_eager keeps the test
    free of a C++ compile; inductor also compiles it, in ~20 s on this machine)."""
    x = torch.randn(2, 5, 200, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, 200, (2, 4), device=DEVICE)

    def loss_fn(logits, labels):
        lp, h = ak.logprobs_and_entropy(logits[:, :-1], labels, temperature=0.9, backend="triton")
        return (2 * lp + h).sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss = compiled(x, labels)
    loss.backward()
    grad, x.grad = x.grad.clone(), None
    eager = loss_fn(x, labels)
    eager.backward()
    assert torch.equal(loss, eager) and torch.equal(grad, x.grad)
