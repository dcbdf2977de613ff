"""Single-pass AEM policy loss (aem_kernels/ops/policy_loss/triton.py) against the two-pass paths, the fp64
reference and the torch statement of the per-token derivatives (`ops.policy_loss.token_loss_derivatives`).

The batch is built so that every branch of the surrogate's gradient is taken: tokens inside the clip range,
above it (A > 0: gradient 0), below it (A < 0: gradient 0), under the dual clip (A < 0, rho > c), a k3 KL
term beyond its clamps, an untrained token and an empty response. The interpreter runs one tile per row
here (V = 160 < 256) to keep the 30-case matrix fast; multi-tile rows are covered by a separate test and by
test_logprobs_triton.py.
"""

import pytest
import torch

import aem_kernels as ak
from aem_kernels.ops.logprobs import naive as ref
from helpers import DEVICE

pytest.importorskip("triton")
from aem_kernels.ops.policy_loss import triton as tl_loss  # noqa: E402
from aem_kernels.ops import utils as tl_utils  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]

TOKEN_RESPONSE = [0, 0, 0, 1, 1, -1, 2, 2, 3, 3]
RESPONSE_GROUP = [0, 0, 1, 1, 1]                 # response 4 has no token
ADVANTAGES = [1.0, -0.8, -0.5, 0.7, 0.3]
# l - l_old per token: 0.5 / -0.5 leave the clip range (log 1.2 = 0.18), 1.5 passes the dual clip (e^1.5 > 3).
LOG_RATIO = [0.5, -0.5, 0.05, 1.5, -0.05, 0.0, 0.5, -0.5, 1.5, 0.02]
REF_OFFSET = [0.3, -0.2, 0.1, 0.0, 0.2, 0.0, -0.3, 0.1, 0.2, 25.0]   # the last one is beyond k3's clamps
TEMPERATURE = 0.8


@pytest.fixture
def one_tile(monkeypatch):
    monkeypatch.setattr(tl_utils, "INTERPRET_MAX_BLOCK_V", 256)


def _batch(vocab=160, dtype=torch.float32):
    n = len(TOKEN_RESPONSE)
    full = torch.randn(n, vocab + 3, device=DEVICE) * 2
    logits = full[:, :vocab].to(dtype)  # rows strided by V + 3
    labels = torch.randint(0, vocab, (n,), device=DEVICE)
    current, _ = ref.logprobs_and_entropy_ref(logits.double(), labels, temperature=TEMPERATURE)
    tensor = (lambda values: torch.tensor(values, device=DEVICE))  # noqa: E731
    old = (current - tensor(LOG_RATIO).double()).float()
    extras = dict(token_response=tensor(TOKEN_RESPONSE), response_group=tensor(RESPONSE_GROUP),
                  old_logprobs=old, old_entropy=torch.rand(n, device=DEVICE) * 3,
                  ref_logprobs=(current + tensor(REF_OFFSET).double()).float())
    return logits, labels, tensor(ADVANTAGES), extras


def _run(logits, labels, advantages, extras, config, backend, single_pass, dtype=None, grad_scale=1.0):
    x = logits.detach().to(dtype or logits.dtype).requires_grad_()
    loss, metrics = ak.aem_policy_loss(x, labels, advantages, config=config, backend=backend,
                                       single_pass=single_pass, **extras)
    (loss * grad_scale).backward()
    return loss.detach(), x.grad, metrics, loss


def _assert_matches(result, expected, rtol=1e-5):
    loss, grad, metrics = result[:3]
    exp_loss, exp_grad, exp_metrics = expected[:3]
    scale = exp_grad.abs().max().item()
    # fp32 kernel vs fp64: per-entry errors of a few fp32 ulps of the largest entry (measured <= 4e-7 relative).
    torch.testing.assert_close(loss.double(), exp_loss.double(), rtol=rtol, atol=rtol * max(1.0, abs(exp_loss)))
    torch.testing.assert_close(grad.double(), exp_grad.double(), rtol=1e-4, atol=rtol * scale)
    for key, value in exp_metrics.items():
        torch.testing.assert_close(metrics[key].double(), value.double(), rtol=rtol, atol=rtol, msg=key)


@pytest.mark.parametrize("dual_clip", [3.0, None])
@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3"])
@pytest.mark.parametrize("agg", ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
                                 "seq-mean-token-sum-norm"])
def test_single_pass_matches_two_pass_and_fp64(agg, kl_type, dual_clip, one_tile):
    logits, labels, advantages, extras = _batch()
    config = ak.AEMConfig(surprisal_source="old", loss_agg_mode=agg, kl_type=kl_type, kl_coef=0.1,
                          entropy_coef=0.01, dual_clip=dual_clip, temperature=TEMPERATURE)
    single = _run(logits, labels, advantages, extras, config, "triton", True)
    assert type(single[3].grad_fn).__name__ == "FusedGradientFunctionBackward"
    two_pass = _run(logits, labels, advantages, extras, config, "torch", False)
    fp64 = _run(logits, labels, advantages, extras, config, "torch", False, dtype=torch.float64)
    _assert_matches(single, two_pass)
    _assert_matches(single, fp64)
    # The batch really exercises the branches (so the comparison above can fail on any of them).
    metrics = fp64[2]
    assert 0 < metrics["actor/pg_clipfrac"] < 1
    assert (metrics["actor/pg_clipfrac_lower"] > 0) == (dual_clip is not None)


def test_single_pass_is_bitwise_the_two_pass_triton_forward():
    """Same l_t, h_t as the Triton forward (same streaming kernel code), hence identical loss and metrics;
    the gradient differs only by the rounding of a_t, b_t. Multi-tile rows (V = 300, 3 tiles)."""
    logits, labels, advantages, extras = _batch(vocab=300)
    config = ak.AEMConfig(surprisal_source="old", uncertainty="surprisal", kl_coef=0.05, entropy_coef=-0.02,
                          temperature=TEMPERATURE, loss_agg_mode="seq-mean-token-mean")
    single = _run(logits, labels, advantages, extras, config, "triton", True)
    two_pass = _run(logits, labels, advantages, extras, config, "triton", False)
    assert torch.equal(single[0], two_pass[0])
    assert single[2].keys() == two_pass[2].keys()
    for key in single[2]:
        assert torch.equal(single[2][key], two_pass[2][key]), key
    torch.testing.assert_close(single[1], two_pass[1], rtol=1e-5, atol=1e-7)


def test_beta_zero_uses_single_pass_by_default_with_current_source(one_tile):
    logits, labels, advantages, extras = _batch()
    config = ak.AEMConfig(beta=0.0, w_max=0.9, temperature=TEMPERATURE)  # w = min(1, 0.9) for every response
    auto = _run(logits, labels, advantages, extras, config, "triton", None)
    assert type(auto[3].grad_fn).__name__ == "FusedGradientFunctionBackward"
    fp64 = _run(logits, labels, advantages, extras, config, "torch", None, dtype=torch.float64)
    _assert_matches(auto, fp64)
    expected_weights = torch.tensor([0.9] * 4 + [1.0], device=DEVICE)  # the empty response keeps w = 1
    torch.testing.assert_close(auto[2]["aem/weights"], expected_weights)
    # beta != 0 with the current policy's entropies: the weights need the full forward first -> two passes.
    current = _run(logits, labels, advantages, extras, ak.AEMConfig(temperature=TEMPERATURE), "triton", None)
    assert type(current[3].grad_fn).__name__ != "FusedGradientFunctionBackward"


def test_token_level_advantages_and_on_policy(one_tile):
    logits, labels, _, extras = _batch()
    extras = dict(extras, old_logprobs=None)  # on-policy: rho = 1
    token_adv = torch.randn(len(TOKEN_RESPONSE), device=DEVICE)
    config = ak.AEMConfig(surprisal_source="old", loss_agg_mode="seq-mean-token-sum", temperature=TEMPERATURE)
    single = _run(logits, labels, token_adv, extras, config, "triton", True)
    fp64 = _run(logits, labels, token_adv, extras, config, "torch", False, dtype=torch.float64)
    _assert_matches(single, fp64)


def test_inplace_gradient_grad_scaling_and_single_backward(one_tile):
    logits, labels, advantages, extras = _batch()
    config = ak.AEMConfig(surprisal_source="old", kl_coef=0.1, temperature=TEMPERATURE)
    expected = _run(logits, labels, advantages, extras, config, "triton", True, grad_scale=3.0)
    plain = _run(logits, labels, advantages, extras, config, "triton", True)
    torch.testing.assert_close(expected[1], 3.0 * plain[1], rtol=1e-6, atol=0)

    base = logits.detach().clone().requires_grad_()
    work = base * 1.0  # a non-leaf whose storage may be overwritten (as logits from an lm_head would be)
    loss, _ = ak.aem_policy_loss(work, labels, advantages, config=config, backend="triton", single_pass=True,
                                 inplace_backward=True, **extras)
    torch.testing.assert_close(work.detach(), plain[1])  # the gradient replaced the logits in the forward
    (3.0 * loss).backward(retain_graph=True)
    torch.testing.assert_close(base.grad, expected[1], rtol=1e-6, atol=1e-9)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


def test_no_grad_leaves_the_logits_untouched(one_tile):
    logits, labels, advantages, extras = _batch()
    config = ak.AEMConfig(surprisal_source="old", temperature=TEMPERATURE)
    before = logits.clone()
    with torch.no_grad():
        loss, metrics = ak.aem_policy_loss(logits, labels, advantages, config=config, backend="triton",
                                           single_pass=True, inplace_backward=True, **extras)
    assert torch.equal(logits, before) and loss.grad_fn is None
    expected, _ = ak.aem_policy_loss(logits.double(), labels, advantages, config=config, backend="torch", **extras)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_all_tokens_untrained(one_tile):
    logits, labels, advantages, extras = _batch()
    extras = dict(extras, token_response=torch.full((len(TOKEN_RESPONSE),), -1, device=DEVICE))
    config = ak.AEMConfig(surprisal_source="old", kl_coef=0.1, entropy_coef=0.1, temperature=TEMPERATURE)
    loss, grad, _, _ = _run(logits, labels, advantages, extras, config, "triton", True)
    assert loss == 0 and (grad == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_padded_half_precision_non_contiguous(dtype, one_tile):
    """Padded form on logits[:, :-1] of a [B, T+1, V] tensor (horizon T for seq-mean-token-sum-norm).
    bf16/fp16 logits are computed in fp32; against fp64 on the same rounded inputs the loss agrees to fp32
    accuracy and the gradient to half an ulp of the storage dtype (2^-8 bf16, 2^-11 fp16, relative), plus
    the fp32 error of entries near 0 (measured max: 1.9e-5 bf16, 1.5e-6 fp16 of a max |grad| ~ 0.05)."""
    b, t, vocab = 2, 5, 160
    full = (torch.randn(b, t + 1, vocab, device=DEVICE) * 2).to(dtype)
    logits = full[:, :-1]
    labels = torch.randint(0, vocab, (b, t), device=DEVICE)
    mask = torch.ones(b, t, dtype=torch.bool, device=DEVICE)
    mask[1, 3:] = False
    extras = dict(response_mask=mask, response_group=torch.tensor([0, 0], device=DEVICE),
                  old_entropy=torch.rand(b, t, device=DEVICE),
                  old_logprobs=-torch.rand(b, t, device=DEVICE) * 6)
    config = ak.AEMConfig(surprisal_source="old", loss_agg_mode="seq-mean-token-sum-norm", entropy_coef=0.01,
                          temperature=TEMPERATURE)
    advantages = torch.tensor([0.6, -1.1], device=DEVICE)
    single = _run(logits, labels, advantages, extras, config, "triton", True)
    assert single[1].dtype == dtype
    fp64 = _run(logits, labels, advantages, extras, config, "torch", False, dtype=torch.float64)
    torch.testing.assert_close(single[0].double(), fp64[0], rtol=1e-5, atol=1e-6)
    half_ulp = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    err = (single[1].double() - fp64[1]).abs()
    assert (err <= half_ulp * fp64[1].abs() + 1e-7).all(), f"max error {err.max().item():.3g}"


def test_single_pass_errors():
    logits, labels, advantages, extras = _batch(vocab=20)
    old = ak.AEMConfig(surprisal_source="old")
    with pytest.raises(ValueError, match="surprisal_source"):
        ak.aem_policy_loss(logits, labels, advantages, config=ak.AEMConfig(), backend="triton", single_pass=True,
                           **extras)
    with pytest.raises(ValueError, match="Triton kernel"):
        ak.aem_policy_loss(logits, labels, advantages, config=old, backend="torch", single_pass=True, **extras)
    # fp64: the Triton backend refuses the logits (fp32 math) when it is named; "auto" routes them to a
    # backend that computes in fp64, which has no single-pass kernel
    with pytest.raises(ak.BackendUnavailableError, match="fp32.*fp64"):
        ak.aem_policy_loss(logits.double(), labels, advantages, config=old, backend="triton", single_pass=True,
                           **extras)
    with pytest.raises(ValueError, match="single-pass.*fp64"):
        ak.aem_policy_loss(logits.double(), labels, advantages, config=old, backend="auto", single_pass=True,
                           **extras)
    with pytest.raises(ValueError, match="old_entropy"):
        ak.aem_policy_loss(logits, labels, advantages, config=old, backend="triton", single_pass=True,
                           **dict(extras, old_entropy=None))
    with pytest.raises(TypeError, match="single_pass"):
        ak.aem_policy_loss(logits, labels, advantages, config=old, backend="triton", single_pass="yes", **extras)
    n = labels.numel()
    with pytest.raises(ValueError, match="grad_out3d"):  # the op itself refuses a buffer it would overrun
        tl_loss.aem_loss_fused_fwd(
            logits.unsqueeze(0), labels, torch.zeros(n), torch.zeros(n), None, None, 1.0, -100, 0.2, 0.2, None,
            0.0, 0.0, "k3", torch.empty(1, n - 1, logits.shape[-1]))


@pytest.mark.parametrize("dual_clip", [3.0, None])
@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3"])
def test_kernel_derivatives_are_the_torch_statement(kl_type, dual_clip, one_tile):
    """The kernel's hand-written dL_t/dl_t (surrogate, dual clip, KL with its clamps) and entropy term equal
    `ops.policy_loss.token_loss_derivatives` (the one torch statement of them, autograd of the loss's own
    terms): the kernel's gradient is the section-6 backward of the fp64 oracle fed with those scalars, on the
    kernel's own l_t and h_t. Every branch of the batch (`_batch`) is taken."""
    from aem_kernels.ops.policy_loss import token_loss_derivatives

    logits, labels, advantages, extras = _batch()
    config = ak.AEMConfig(surprisal_source="old", kl_type=kl_type, kl_coef=0.1, entropy_coef=0.01,
                          dual_clip=dual_clip, temperature=TEMPERATURE)
    n = labels.numel()
    token_response = extras["token_response"]
    trained = token_response >= 0
    token_adv = torch.where(trained, advantages[token_response.clamp(min=0)], 0.0)
    token_weights = torch.linspace(0.5, 1.5, n, device=DEVICE) * trained
    x = logits.detach().requires_grad_()
    lp, ent, grad = tl_loss.aem_loss_single_pass(
        x, labels, token_adv, token_weights, extras["old_logprobs"], extras["ref_logprobs"],
        temperature=TEMPERATURE, ignore_index=-100, clip_low=config.clip_low, clip_high=config.clip_high,
        dual_clip=dual_clip, entropy_coef=config.entropy_coef, kl_coef=config.kl_coef, kl_type=config.kl_type,
        inplace_backward=False)
    a, b = token_loss_derivatives(lp.double(), extras["old_logprobs"].double(), token_adv.double(),
                                  token_weights.double(), extras["ref_logprobs"].double(), config)
    assert b is not None and bool((a != 0).any())
    logits3d = logits.detach().double().unsqueeze(0)
    _, entropy, lse = ref.logprobs_entropy_fwd_ref(logits3d, labels, TEMPERATURE, -100)
    expected = ref.logprobs_entropy_bwd_ref(logits3d, labels, lse, entropy, a, b, TEMPERATURE, -100,
                                            torch.empty_like(logits3d)).squeeze(0)
    # fp32 kernel against the fp64 oracle: a few fp32 ulps of the largest entry (as `_assert_matches`)
    scale = expected.abs().max().item()
    torch.testing.assert_close(grad.double(), expected, rtol=1e-4, atol=1e-5 * scale)
