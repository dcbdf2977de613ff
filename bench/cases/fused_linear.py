"""Cases (d, e): from hidden states to log-probs (and entropies), forward + backward, gradients to the hidden
states and the classifier weight; ours never builds the logits (`ak.fused_linear_logprobs_and_entropy`).

    fused_linear_fwd_bwd          log-probs and entropies, a gradient through both (random upstream weights)
    fused_linear_logprob_fwd_bwd  log-probs only (cross-entropy's work: the case Cut-Cross-Entropy, Liger's
                                  fused linear cross-entropy and verl's kernel compete in); ours runs with
                                  with_entropy=False there

Inputs: hidden [N / seq_len, seq_len, H] ~ N(0, 1), weight [V, H] ~ N(0, (2.5 / sqrt(H))^2) (logits of std
~2.5, LLM-like), labels uniform in [0, V); H = 1024 on the CPU, 4096 on CUDA. The lines, each written the way
its users write it (all take hidden states; the logits-input lines of the other cases do not run here):

    fused[<backend>]        ours, every backend that can serve the device (CPU: the chunked C++ path)
    fused[default]          ours as a user calls it (no backend, no path: the package's default CUDA plan; CUDA)
    fused[tiles]            ours with path="tiles": the Triton tile kernels, raced against the default plan (CUDA)
    eager-linear            logits = hidden @ weight.T in the inputs' dtype, then the eager log_softmax formula
    torch.compile-linear    torch.compile of eager-linear
    trl-chunked-linear      TRL's per-sequence loop: logits of one row of the batch at a time, then TRL's
                            selective_log_softmax / entropy_from_logits (autograd keeps every row's graph)
    cce[torch_compile]      Cut-Cross-Entropy's `linear_cross_entropy(..., impl="torch_compile")`, negated
    cut-cross-entropy       CCE's Triton kernel (CUDA)
    liger-flce              -LigerFusedLinearCrossEntropyLoss(reduction="none") (CUDA)
    verl-linear-ce          verl's `utils.kernel.linear_cross_entropy` (log-probs and entropies; CUDA); where
                            `import verl` fails (its __init__ imports Ray, absent from the lent GPU image) the
                            kernel's own modules are loaded from the installed verl without that __init__
    trl-chunked-logprob     TRL's `kernels.chunked_logprob.ChunkedLogProbFunction` (cuBLAS tiles + a Triton fold;
                            CUDA: on the CPU TRL folds in torch ops, a fallback) with outputs ("entropy",) and
                            TRL's chunk size 32768

Lines whose logits are rounded to the inputs' dtype (the materialising ones, at bf16/fp16) report their
per-token outputs in that dtype, so the checker applies that dtype's tolerance to them (as for TRL and verl in
the logits cases). The reference is our chunked C++ path on the CPU (the torch one where the extension is not
built) and the package's default plan (`fused[default]`) on CUDA.
Peak memory includes the gradients of hidden and weight, which every line returns; the README subtracts them.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from typing import Dict, List, Optional

import torch

import aem_kernels as ak

from .. import measure
from ..implementations import eager_logprobs_entropy, trl_entropy_from_logits, trl_selective_log_softmax
from ..lines import Implementation, compile_reason, import_reason
from ..roofline import Work, fused_linear_work
from .base import Case, Inputs, Outputs, Point

LOGIT_STD = 2.5
_ROUNDS_LOGITS = {"eager-linear", "torch.compile-linear", "trl-chunked-linear", "cce[torch_compile]"}


def hidden_size(device: torch.device) -> int:
    return 4096 if device.type == "cuda" else 1024


# --- the lines: fn(hidden [B, T, H], weight [V, H], labels [B, T], with_entropy) -> (logprobs, entropy | None)
def _ours(backend: str, path: str = "auto"):
    def fused(hidden, weight, labels, with_entropy):
        return ak.fused_linear_logprobs_and_entropy(hidden, weight, labels, with_entropy=with_entropy,
                                                    backend=backend, path=path)
    return fused


def eager_linear(hidden, weight, labels, with_entropy):
    logprobs, entropy = eager_logprobs_entropy(hidden @ weight.T, labels, entropy_grad=with_entropy)
    return logprobs, (entropy if with_entropy else None)


_COMPILED: Dict[str, object] = {}


def compiled_linear(hidden, weight, labels, with_entropy):
    if "fn" not in _COMPILED:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        _COMPILED["fn"] = torch.compile(eager_linear)
    return _COMPILED["fn"](hidden, weight, labels, with_entropy)


def trl_chunked_linear(hidden, weight, labels, with_entropy):
    logprobs, entropy = [], []
    for row, row_labels in zip(hidden, labels):       # one sequence of the batch at a time
        logits = (row @ weight.T).unsqueeze(0)
        logprobs.append(trl_selective_log_softmax(logits, row_labels.unsqueeze(0))[0])
        if with_entropy:
            entropy.append(trl_entropy_from_logits(logits)[0])
    return torch.stack(logprobs), (torch.stack(entropy) if with_entropy else None)


def cce_torch_compile(hidden, weight, labels, with_entropy):
    from cut_cross_entropy import linear_cross_entropy

    return -linear_cross_entropy(hidden, weight, labels, reduction="none", impl="torch_compile"), None


def liger_flce(hidden, weight, labels, with_entropy):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(reduction="none")(weight, hidden.reshape(-1, hidden.shape[-1]),
                                                               labels.reshape(-1))
    return -loss.view(labels.shape), None


def _verl_kernel():
    """verl's `linear_cross_entropy`. verl/__init__.py imports Ray and tensordict (verl.protocol), which a GPU
    image without verl's training stack lacks; the kernel's modules (linear_cross_entropy, kernels,
    utils.device, plugin.platform) need only torch, triton and packaging, so there they are loaded from the
    installed verl's files under empty `verl` / `verl.utils` package stand-ins (verl's code itself unchanged)."""
    try:
        from verl.utils.kernel import kernels  # noqa: F401  (what the forward imports: fail here, not there)
        from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy
        return linear_cross_entropy
    except Exception:   # ImportError (Ray absent), or verl's __init__ failing on another package's version
        pass
    spec = importlib.util.find_spec("verl")   # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("verl is not installed")
    for name in [name for name in sys.modules if name == "verl" or name.startswith("verl.")]:
        del sys.modules[name]                  # what the failed import left half-initialised
    root = list(spec.submodule_search_locations)[0]
    for name, folder in (("verl", root), ("verl.utils", os.path.join(root, "utils"))):
        package = types.ModuleType(name)
        package.__path__ = [folder]
        sys.modules[name] = package
    importlib.import_module("verl.utils.kernel.kernels")
    return importlib.import_module("verl.utils.kernel.linear_cross_entropy").linear_cross_entropy


def verl_linear_ce(hidden, weight, labels, with_entropy):
    logprobs, entropy = _verl_kernel()(hidden, weight, labels, 1.0, "none")
    return logprobs.view(labels.shape), (entropy.view(labels.shape) if with_entropy else None)


TRL_CHUNK_SIZE = 32768   # the vocabulary width TRL's trainers pass (trl.trainer.utils, 1.16)


def trl_chunked_logprob(hidden, weight, labels, with_entropy):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    flat = hidden.reshape(-1, hidden.shape[-1])
    logprobs, entropy, *_ = ChunkedLogProbFunction.apply(flat, weight, None, labels.reshape(-1), 1.0, TRL_CHUNK_SIZE,
                                                         None, 1.0, ("entropy",) if with_entropy else ())
    return logprobs.view(labels.shape), (entropy.view(labels.shape) if with_entropy else None)


def _verl_reason() -> Optional[str]:
    try:
        _verl_kernel()
    except Exception as exc:   # ImportError, or a module of the kernel failing while it loads
        return f"verl's linear_cross_entropy cannot be loaded ({type(exc).__name__}: {str(exc)[:160]})"
    return None


_LINES: Dict[str, List[Implementation]] = {}


def hidden_implementations(device: torch.device) -> List[Implementation]:
    """The hidden-state lines for `device` (built once per device type, the same objects every call)."""
    if device.type in _LINES:
        return _LINES[device.type]
    lines = []
    interpreter = "Triton on CPU tensors runs in the interpreter, a correctness tool whose speed means nothing"
    triton_reason = ak.available_backends(device)["triton"]
    for backend, reason in ak.available_backends(device).items():
        if reason is None and backend == "triton" and device.type != "cuda":
            reason = interpreter
        lines.append(Implementation(f"fused[{backend}]", f"ak.fused_linear_logprobs_and_entropy(backend='{backend}')",
                                    _ours(backend) if reason is None else None, input_kind="hidden",
                                    unavailable=reason, ours=True, backend=backend))
    if device.type == "cuda":   # what a user gets: backend and path left to the package
        lines.append(Implementation("fused[default]", "ak.fused_linear_logprobs_and_entropy() (the default CUDA "
                                    "plan)", _ours("auto"), input_kind="hidden", ours=True, backend="auto"))
    tiles = triton_reason or (None if device.type == "cuda" else interpreter)
    lines.append(Implementation("fused[tiles]", "ak.fused_linear_logprobs_and_entropy(path='tiles'): the Triton "
                                "tile kernels", None if tiles else _ours("triton", "tiles"), input_kind="hidden",
                                unavailable=tiles, ours=True, backend="triton", path="tiles"))
    gpu = None if device.type == "cuda" else "needs a CUDA device (Triton kernels)"
    no_compile = compile_reason(device)
    cce = import_reason("cut_cross_entropy", "gpu-bench")
    trl = None if gpu else import_reason("trl.kernels.chunked_logprob", "trl")
    lines += [
        Implementation("eager-linear", "hidden @ weight.T, then log_softmax(logits.float()) + gather + entropy",
                       eager_linear, input_kind="hidden"),
        Implementation("torch.compile-linear", "torch.compile(eager-linear); compile time reported apart",
                       None if no_compile else compiled_linear, input_kind="hidden", unavailable=no_compile,
                       compiled=True),
        Implementation("trl-chunked-linear", "per sequence: logits = hidden[b] @ weight.T, TRL selective_log_softmax"
                       " + entropy_from_logits", trl_chunked_linear, input_kind="hidden"),
        Implementation("cce[torch_compile]", "-cut_cross_entropy.linear_cross_entropy(impl='torch_compile'), "
                       "log-probs only", None if cce else cce_torch_compile, input_kind="hidden", unavailable=cce,
                       compiled=True),
        Implementation("liger-flce", "-LigerFusedLinearCrossEntropyLoss(reduction='none'), log-probs only",
                       liger_flce if not (gpu or import_reason("liger_kernel", "gpu-bench")) else None,
                       input_kind="hidden", unavailable=gpu or import_reason("liger_kernel", "gpu-bench")),
        Implementation("verl-linear-ce", "verl.utils.kernel.linear_cross_entropy (log-probs + entropies)",
                       verl_linear_ce if not (gpu or _verl_reason()) else None, input_kind="hidden",
                       unavailable=gpu or _verl_reason()),
        Implementation("trl-chunked-logprob", "TRL's ChunkedLogProbFunction (cuBLAS tiles of 4096 x 32768, a "
                       "Triton fold), log-probs + entropies", None if gpu or trl else trl_chunked_logprob,
                       input_kind="hidden", unavailable=gpu or trl),
    ]
    _LINES[device.type] = lines
    return lines


class FusedLinearForwardBackward(Case):
    name = "fused_linear_fwd_bwd"
    title = "hidden -> log-prob + entropy (fused linear), forward + backward"
    input_kind = "hidden"
    shared_logits = False   # builds hidden [N, H], the classifier [V, H] and the labels itself
    default = False         # run by the fused-linear profiles (or --cases), not by every profile
    backward = True
    with_entropy = True
    entropy_lines = None          # every line computes entropies, except the cross-entropy-only ones

    def work(self, point: Point, phase: Optional[str] = None, h: Optional[int] = None) -> Optional[Work]:
        # bench.roofline: read hidden and weight (forward); 3x, write both gradients, 3 products (fwd+bwd)
        return fused_linear_work("forward" if phase == "forward" else "forward+backward", point.n, point.v,
                                 h or self._h, point.dtype)

    _h = 4096   # set by `extend` to the device's H (hidden_size); the roofline table uses the GPU's

    def extend(self, base: Optional[Inputs], point: Point, device: torch.device, seed: int) -> Inputs:
        """This case's inputs for one point, built from the point alone (shared_logits = False: base is None)."""
        gen = torch.Generator(device=device).manual_seed(seed)
        self._h = h = hidden_size(device)
        dtype = point.torch_dtype
        hidden = torch.randn(point.batch, point.rows, h, generator=gen, device=device).to(dtype)
        weight = torch.empty(point.v, h, dtype=dtype, device=device)
        for start in range(0, point.v, 8192):   # filled in pieces: no fp32 copy of a bf16 weight
            piece = torch.randn(min(8192, point.v - start), h, generator=gen, device=device)
            weight[start:start + piece.shape[0]] = piece * (LOGIT_STD / h ** 0.5)
        labels = torch.randint(0, point.v, (point.batch, point.rows), generator=gen, device=device)
        grads = torch.Generator(device=device).manual_seed(seed + 1)
        extra = {"hidden": hidden, "weight": weight,
                 "grad_logprobs": torch.randn(labels.shape, generator=grads, device=device),
                 "grad_entropy": torch.randn(labels.shape, generator=grads, device=device)}
        return Inputs(logits=None, labels=labels, extra=extra)

    def reference_for(self, default: Implementation) -> Implementation:
        # the same objects as the runner's lines: built by `hidden_implementations` for this process's device
        usable = {line.name: line for lines in _LINES.values() for line in lines if line.fn is not None}
        return usable.get("fused[cpu]") or usable.get("fused[default]") or usable["fused[torch]"]

    def skip_reason(self, impl: Implementation) -> Optional[str]:
        reason = super().skip_reason(impl)
        if reason is None and self.with_entropy and impl.name in ("cce[torch_compile]", "cut-cross-entropy",
                                                                   "liger-flce"):
            return "cross-entropy only (no entropy): it runs in fused_linear_logprob_fwd_bwd"
        return reason

    def prepare(self, impl: Implementation, inputs: Inputs, fresh: bool) -> Inputs:
        extra = dict(inputs.extra)
        extra["hidden"] = inputs.extra["hidden"].detach().requires_grad_()
        extra["weight"] = inputs.extra["weight"].detach().requires_grad_()
        return Inputs(logits=None, labels=inputs.labels, extra=extra)

    def call(self, impl: Implementation, inputs: Inputs) -> Outputs:
        hidden, weight = inputs.extra["hidden"], inputs.extra["weight"]
        if impl.name == "cut-cross-entropy":   # the shared CCE line: fn(hidden, classifier, labels)
            logprobs, entropy = impl.fn(hidden, weight, inputs.labels), None
        else:
            logprobs, entropy = impl.fn(hidden, weight, inputs.labels, self.with_entropy)
        measure.phase_end("forward")
        outputs, grad_outputs = [logprobs], [inputs.extra["grad_logprobs"].to(logprobs.dtype)]
        if self.with_entropy:
            outputs.append(entropy)
            grad_outputs.append(inputs.extra["grad_entropy"].to(entropy.dtype))
        grad_hidden, grad_weight = torch.autograd.grad(outputs, (hidden, weight), grad_outputs)
        result = {"logprobs": logprobs.detach()}
        if self.with_entropy:
            result["entropy"] = entropy.detach()
        if impl.name in _ROUNDS_LOGITS:
            result = {k: v.to(hidden.dtype) for k, v in result.items()}
        result.update(grad_hidden=grad_hidden, grad_weight=grad_weight)
        return result


class FusedLinearLogprobForwardBackward(FusedLinearForwardBackward):
    name = "fused_linear_logprob_fwd_bwd"
    title = "hidden -> log-prob only (cross-entropy work; ours with_entropy=False), forward + backward"
    with_entropy = False


class FusedLinearLossForwardBackward(FusedLinearForwardBackward):
    """Case (f): the AEM policy loss from hidden states, forward + backward, in a later PPO epoch (old
    log-probs and old entropies known, `surprisal_source="old"`: the modulation weights are fixed before the
    forward, so ours takes its single pass for fp32). Ours: `ak.fused_linear_aem_policy_loss`; every other
    line computes (log-prob, entropy) from the hidden states its own way and applies the package's O(N) AEM
    tail (as case (c) does for logits), so the comparison isolates the N x V work."""

    name = "fused_linear_loss_fwd_bwd"
    title = "hidden -> AEM policy loss (surprisal_source='old'), forward + backward"
    with_entropy = True
    config = ak.AEMConfig(surprisal_source="old")
    responses_per_row = 4
    group_size = 4

    def extend(self, base: Optional[Inputs], point: Point, device: torch.device, seed: int) -> Inputs:
        inputs = super().extend(base, point, device, seed)
        batch, rows = inputs.labels.shape
        position = torch.arange(rows, device=device)
        length = -(-rows // self.responses_per_row)
        per_row = -(-rows // length)
        response = torch.arange(batch, device=device)[:, None] * per_row + position[None, :] // length
        token_response = torch.where((position < rows // 8)[None, :], -1, response)   # prompts untrained
        gen = torch.Generator(device=device).manual_seed(seed + 2)
        num_responses = batch * per_row
        extra = inputs.extra
        extra["token_response"] = token_response
        extra["response_group"] = torch.arange(num_responses, device=device) // self.group_size
        extra["advantages"] = torch.randn(num_responses, generator=gen, device=device)
        # a later PPO epoch: old values near (not equal to) the current ones
        extra["old_logprobs"] = -torch.rand(inputs.labels.shape, generator=gen, device=device) * 8
        extra["old_entropy"] = torch.rand(inputs.labels.shape, generator=gen, device=device) * 4
        return inputs

    def skip_reason(self, impl: Implementation) -> Optional[str]:
        reason = Case.skip_reason(self, impl)
        if reason is None and impl.name in ("cce[torch_compile]", "cut-cross-entropy", "liger-flce"):
            return "cross-entropy only: the AEM loss's metrics need the entropy"
        return reason

    def call(self, impl: Implementation, inputs: Inputs) -> Outputs:
        from aem_kernels.loss import loss_from_token_terms, pack_inputs
        
        hidden, weight, extra = inputs.extra["hidden"], inputs.extra["weight"], inputs.extra
        forms = dict(token_response=extra["token_response"], response_group=extra["response_group"],
                     old_logprobs=extra["old_logprobs"], old_entropy=extra["old_entropy"])
        if impl.ours:
            loss, _ = ak.fused_linear_aem_policy_loss(hidden, weight, inputs.labels, extra["advantages"],
                                                      config=self.config, backend=impl.backend,
                                                      path=impl.path or "auto", **forms)
        else:
            logprobs, entropy = impl.fn(hidden, weight, inputs.labels, True)
            batch = pack_inputs(_logits_shape(hidden, weight), inputs.labels, extra["advantages"],
                                response_mask=None, turn_ids=None, ref_logprobs=None,
                                ignore_index=self.config.ignore_index, advantage_level="response", num_groups=None,
                                **forms)
            loss, _ = loss_from_token_terms(batch, logprobs.float().reshape(-1), entropy.float().reshape(-1),
                                             self.config)
        result = {}
        if not impl.ours:   # not compared; its dtype sets the loss's tolerance (the lines with rounded logits)
            result["logprobs"] = logprobs.detach().to(hidden.dtype if impl.name in _ROUNDS_LOGITS else torch.float32)
        measure.phase_end("forward")
        grad_hidden, grad_weight = torch.autograd.grad(loss, (hidden, weight))
        result.update(loss=loss.detach(), grad_hidden=grad_hidden, grad_weight=grad_weight)
        return result


def _logits_shape(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A zero-stride stand-in of the logits' shape for `pack_inputs` (nothing of size N x V is allocated)."""
    return hidden.new_zeros(()).expand(*hidden.shape[:-1], weight.shape[0])
