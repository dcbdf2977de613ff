"""Public API: exports, backend dispatch, drop-in equality with verl's and TRL's formulas, and input errors."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import aem_kernels as ak
from aem_kernels import capability
from aem_kernels.ops.logprobs import resolve_backend

from helpers import oracle_logprobs_entropy


def test_public_names():
    for name in ("logprobs_from_logits", "entropy_from_logits", "logprobs_and_entropy", "response_surprisal",
                 "response_entropy", "modulate_advantages", "aem_policy_loss", "AEMConfig", "AEMLoss"):
        assert name in ak.__all__ and callable(getattr(ak, name))


def test_dispatch_auto_and_errors():
    assert resolve_backend("torch", torch.device("cpu")).name == "torch"
    expected = "cpu" if (capability.cpu_extension() is not None) else "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the one-time "extension not built" warning is tested with the C++ path
        assert resolve_backend("auto", torch.device("cpu")).name == expected
    with pytest.raises(ValueError, match="backend"):
        ak.logprobs_from_logits(torch.randn(2, 3), torch.tensor([0, 1]), backend="gpu")
    if not (capability.cpu_extension() is not None):
        with pytest.raises(ak.BackendUnavailableError, match="cpu"):
            ak.logprobs_from_logits(torch.randn(2, 3), torch.tensor([0, 1]), backend="cpu")
    reasons = ak.available_backends("cpu")
    assert reasons["torch"] is None and set(reasons) == {"triton", "cpu", "torch"}


# --- drop-in: verl.utils.torch_functional and TRL, written from their documented behaviour ---------------

def verl_logprobs_from_logits(logits, labels):
    # verl's logsumexp path for fp32: gather the label logit, subtract a per-row logsumexp
    target = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return target - torch.stack([torch.logsumexp(row, dim=-1) for row in logits])


def verl_entropy_from_logits(logits):
    probs = F.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def trl_selective_log_softmax(logits, index):
    if logits.dtype in (torch.float32, torch.float64):
        target = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1)
        return target - torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
    return torch.stack([F.log_softmax(row, dim=-1).gather(-1, idx.unsqueeze(-1)).squeeze(-1)
                        for row, idx in zip(logits, index)])


def trl_entropy_from_logits(logits, chunk_size=128):
    flat = logits.reshape(-1, logits.shape[-1])
    parts = []
    for chunk in flat.split(chunk_size):
        logps = F.log_softmax(chunk, dim=-1)
        parts.append(-(logps.exp() * logps).sum(-1))
    return torch.cat(parts).reshape(logits.shape[:-1])


def test_drop_in_fp32_matches_verl_and_trl_call_patterns():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 17, 301, generator=g) * 4
    labels = torch.randint(0, 301, (4, 17), generator=g)
    ours_lp = ak.logprobs_from_logits(logits, labels, inplace_backward=False)   # verl's keyword
    ours_sel = ak.selective_log_softmax(logits, labels)                       # TRL's name and order
    ours_idx = ak.logprobs_from_logits(logits, index=labels)                  # TRL's keyword
    ours_h = ak.entropy_from_logits(logits)
    ours_h_trl = ak.entropy_from_logits(logits, chunk_size=64)
    # fp32 rounding of O(|z|) terms, |z| <= ~20 here
    tol = dict(rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ours_lp, verl_logprobs_from_logits(logits, labels), **tol)
    torch.testing.assert_close(ours_sel, trl_selective_log_softmax(logits, labels), **tol)
    torch.testing.assert_close(ours_idx, ours_lp, rtol=0, atol=0)
    torch.testing.assert_close(ours_h, verl_entropy_from_logits(logits), **tol)
    torch.testing.assert_close(ours_h_trl, trl_entropy_from_logits(logits, 64), **tol)


def test_bf16_error_is_no_worse_than_the_eager_formulas():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(64, 1000, generator=g) * 3).to(torch.bfloat16)
    labels = torch.randint(0, 1000, (64,), generator=g)
    lp_ref, h_ref = oracle_logprobs_entropy(logits, labels)
    ours_err = (ak.logprobs_from_logits(logits, labels).double() - lp_ref).abs().max()
    trl_err = (trl_selective_log_softmax(logits, labels).double() - lp_ref).abs().max()
    assert ours_err <= trl_err + 1e-6
    ours_h_err = (ak.entropy_from_logits(logits).double() - h_ref).abs().max()
    verl_h_err = (verl_entropy_from_logits(logits).double() - h_ref).abs().max()
    assert ours_h_err <= verl_h_err + 1e-6
    assert ours_err < 1e-5 and ours_h_err < 1e-5  # fp32 math inside: measured ~1e-6 here


# --- errors: one test per bad input ----------------------------------------------------------------------

@pytest.mark.parametrize("call, error, match", [
    (lambda: ak.logprobs_from_logits(torch.randn(3, 5), torch.tensor([0, 5, 1])), ValueError, "labels"),
    (lambda: ak.logprobs_from_logits(torch.randn(3, 5), torch.tensor([0, -1, 1])), ValueError, "labels"),
    (lambda: ak.logprobs_from_logits(torch.randn(3, 5), torch.tensor([0, 1])), ValueError, "labels"),
    (lambda: ak.logprobs_from_logits(torch.randn(3, 5), torch.tensor([0.0, 1.0, 2.0])), TypeError, "labels"),
    (lambda: ak.logprobs_from_logits(torch.randn(3, 5), torch.tensor([True, False, True])), TypeError, "labels"),
    (lambda: ak.logprobs_from_logits(torch.randn(3, 5), [0, 1, 2]), TypeError, "labels"),
    (lambda: ak.logprobs_from_logits(torch.randn(3, 5)), TypeError, "labels"),
    (lambda: ak.logprobs_from_logits(torch.randn(3, 5), torch.tensor([0, 1, 2]), index=torch.tensor([0, 1, 2])),
     TypeError, "index"),
    (lambda: ak.logprobs_from_logits(torch.randn(3, 5), torch.tensor([0, 1, 2]), temperature=0.0), ValueError,
     "temperature"),
    (lambda: ak.logprobs_from_logits(torch.randn(3, 5), torch.tensor([0, 1, 2]), temperature=-2.0), ValueError,
     "temperature"),
    (lambda: ak.entropy_from_logits(torch.randn(3, 5), temperature=float("nan")), ValueError, "temperature"),
    (lambda: ak.entropy_from_logits(torch.randn(3, 5), temperature="hot"), TypeError, "temperature"),
    (lambda: ak.entropy_from_logits(torch.randint(0, 3, (3, 5))), TypeError, "logits"),
    (lambda: ak.entropy_from_logits(torch.randn(5, 3).t()), ValueError, "stride"),
    (lambda: ak.entropy_from_logits(torch.randn(3, 0)), ValueError, "V >= 1"),
    (lambda: ak.entropy_from_logits(torch.tensor(1.0)), ValueError, "logits"),
    (lambda: ak.entropy_from_logits(torch.randn(3, 5), chunk_size=-1), ValueError, "chunk_size"),
    (lambda: ak.logprobs_and_entropy(torch.randn(3, 5), torch.tensor([0, 1, 2]), ignore_index=None), TypeError,
     "ignore_index"),
    (lambda: ak.response_surprisal(torch.randn(4), torch.tensor([0, 1, 2, 3]), 3), ValueError, "token_response"),
    (lambda: ak.response_surprisal(torch.randn(4), torch.tensor([0, 1, -2, 0]), 3), ValueError, "token_response"),
    (lambda: ak.response_surprisal(torch.randn(4), torch.tensor([0, 1]), 3), ValueError, "token_response"),
    (lambda: ak.response_entropy(torch.randn(4), torch.tensor([0, 1, 1, 0]), -1), ValueError, "num_responses"),
    (lambda: ak.response_entropy(torch.randn(4), torch.tensor([0, 1, 1, 0]), 2.0), TypeError, "num_responses"),
    (lambda: ak.response_entropy(torch.arange(4), torch.tensor([0, 1, 1, 0]), 2), TypeError, "token_entropy"),
    (lambda: ak.response_entropy(torch.randn(4), torch.tensor([0, 1, 1, 0]), 2, reduction="max"), ValueError,
     "reduction"),
])
def test_bad_inputs_raise_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_ignore_index_label_is_allowed_and_value_checks_can_be_skipped():
    logits = torch.randn(3, 5)
    ak.logprobs_from_logits(logits, torch.tensor([0, -100, 4]))
    ak.logprobs_from_logits(logits, torch.tensor([0, -1, 4]), ignore_index=-1)
    with ak.skip_value_checks():  # no host sync: the user vouches for the labels
        out = ak.logprobs_from_logits(logits, torch.tensor([0, 1, 4]), backend="torch")
    assert out.shape == (3,)
