"""ak.causal_lm_logprobs_and_entropy / ak.causal_lm_aem_policy_loss on small locally built Llama, Qwen2 and
Mistral models (tied and untied embeddings) against model(...).logits through ak.logprobs_and_entropy, and
ak.fused_linear_aem_policy_loss against ak.aem_policy_loss on materialised logits."""

from __future__ import annotations

import pytest
import torch

import aem_kernels as ak

transformers = pytest.importorskip("transformers")

VOCAB = 311


def _model(kind: str, tied: bool):
    common = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  tie_word_embeddings=tied)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[kind]
    torch.manual_seed(0)
    model = model_cls(config_cls(**common)).eval()
    if tied:
        assert model.lm_head.weight is model.get_input_embeddings().weight
    return model


def _batch():
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (3, 11), generator=gen)
    attention_mask = torch.ones(3, 11, dtype=torch.long)
    attention_mask[1, 8:] = 0      # right padding
    attention_mask[2, 5:] = 0
    return input_ids, attention_mask


def _param_grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind,tied", [("llama", False), ("qwen2", True), ("mistral", False), ("llama", True)])
def test_matches_the_models_logits(kind, tied):
    model = _model(kind, tied)
    input_ids, attention_mask = _batch()
    gen = torch.Generator().manual_seed(2)
    ga, gb = torch.randn(3, 10, generator=gen), torch.randn(3, 10, generator=gen)

    lp, ent = ak.causal_lm_logprobs_and_entropy(model, input_ids, attention_mask=attention_mask, temperature=0.8)
    ((lp * ga).sum() + (ent * gb).sum()).backward()
    ours = _param_grads(model)
    model.zero_grad(set_to_none=True)

    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    labels = torch.where(attention_mask[:, 1:] != 0, input_ids[:, 1:], -100)
    ref_lp, ref_ent = ak.logprobs_and_entropy(logits, labels, temperature=0.8)
    ((ref_lp * ga).sum() + (ref_ent * gb).sum()).backward()
    ref = _param_grads(model)

    assert lp.shape == (3, 10)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=2e-5)
    assert torch.equal(lp[2, 4:], torch.zeros(6)) and torch.equal(ent[1, 7:], torch.zeros(3))
    assert ours.keys() == ref.keys() and "lm_head.weight" in ours or tied
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-4, atol=1e-5, msg=name)


def test_explicit_labels_both_alignments():
    model = _model("qwen2", True)
    input_ids, attention_mask = _batch()
    shifted = input_ids[:, 1:].clone()
    shifted[0, :3] = -100
    lp_shifted, _ = ak.causal_lm_logprobs_and_entropy(model, input_ids, labels=shifted)
    per_position = torch.cat([shifted, torch.full((3, 1), -100)], dim=1)
    lp_pos, _ = ak.causal_lm_logprobs_and_entropy(model, input_ids, labels=per_position)
    assert lp_shifted.shape == (3, 10) and lp_pos.shape == (3, 11)
    torch.testing.assert_close(lp_pos[:, :-1], lp_shifted, rtol=0, atol=1e-6)
    assert torch.equal(lp_shifted[0, :3], torch.zeros(3))
    with pytest.raises(ValueError, match="labels"):
        ak.causal_lm_logprobs_and_entropy(model, input_ids, labels=shifted[:, :5])
    with pytest.raises(ValueError, match="input_ids"):
        ak.causal_lm_logprobs_and_entropy(model, input_ids[0])
    with pytest.raises(TypeError, match="LM head"):
        ak.causal_lm_logprobs_and_entropy(torch.nn.Linear(3, 3), input_ids)
    with pytest.raises(TypeError, match="labels must be an integer"):
        ak.causal_lm_logprobs_and_entropy(model, input_ids, labels=shifted.float())


class _HeadOnly(torch.nn.Module):
    """An LM head and no backbone (neither .model nor get_decoder())."""

    def __init__(self):
        super().__init__()
        self.lm_head = torch.nn.Linear(8, 13, bias=False)

    def get_output_embeddings(self):
        return self.lm_head


class _Backbone(torch.nn.Module):
    def forward(self, **kwargs):
        raise AssertionError("the backbone ran before the inputs were checked")


def test_errors_name_the_missing_part_before_the_backbone_runs():
    input_ids = torch.randint(0, 13, (2, 6))
    with pytest.raises(TypeError, match="backbone"):
        ak.causal_lm_logprobs_and_entropy(_HeadOnly(), input_ids)
    model = _HeadOnly()
    model.model = _Backbone()
    with pytest.raises(ValueError, match=r"labels must have shape"):
        ak.causal_lm_logprobs_and_entropy(model, input_ids, labels=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="labels must be an integer"):
        ak.causal_lm_logprobs_and_entropy(model, input_ids, labels=torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"labels must have shape"):
        ak.causal_lm_aem_policy_loss(model, input_ids, torch.ones(2), labels=torch.zeros(3, 5, dtype=torch.long),
                                     response_group=torch.zeros(2, dtype=torch.long))


def _loss_batch(n_tokens_shape):
    gen = torch.Generator().manual_seed(3)
    tr = torch.randint(-1, 4, n_tokens_shape, generator=gen)
    return dict(token_response=tr, response_group=torch.tensor([0, 0, 1, 1]),
                old_logprobs=-torch.rand(n_tokens_shape, generator=gen) * 5,
                ref_logprobs=-torch.rand(n_tokens_shape, generator=gen) * 5)


@pytest.mark.parametrize("config", [ak.AEMConfig(), ak.AEMConfig(beta=0.0, kl_coef=0.1, entropy_coef=0.01,
                                                                    loss_agg_mode="seq-mean-token-mean"),
                                    ak.AEMConfig(uncertainty="surprisal", temperature=0.7)])
def test_causal_lm_loss_matches_aem_policy_loss_on_logits(config):
    model = _model("llama", True)
    input_ids, attention_mask = _batch()
    kwargs = _loss_batch((3, 10))
    adv = torch.tensor([1.0, -0.5, 0.3, -1.2])
    loss, metrics = ak.causal_lm_aem_policy_loss(model, input_ids, adv, attention_mask=attention_mask,
                                                 config=config, **kwargs)
    loss.backward()
    ours = _param_grads(model)
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    labels = torch.where(attention_mask[:, 1:] != 0, input_ids[:, 1:], -100)
    ref_loss, ref_metrics = ak.aem_policy_loss(logits, labels, adv, config=config, **kwargs)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert metrics.keys() == ref_metrics.keys()
    for key in metrics:
        torch.testing.assert_close(metrics[key], ref_metrics[key], rtol=1e-4, atol=1e-5, msg=key)
    for name, grad in _param_grads(model).items():
        torch.testing.assert_close(ours[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_fused_linear_loss_padded_turn_form(backend):
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 9, 24, generator=gen, requires_grad=True)
    weight = (torch.randn(301, 24, generator=gen) * 0.3).requires_grad_()
    bias = torch.randn(301, generator=gen, requires_grad=True)
    labels = torch.randint(0, 301, (2, 9), generator=gen)
    turn_ids = torch.tensor([[-1, 0, 0, 0, -1, 1, 1, -1, -1], [-1, -1, 0, 0, 0, 0, -1, 1, 1]])
    old = -torch.rand(2, 9, generator=gen) * 4
    adv = torch.tensor([0.7, -1.1])
    group = torch.tensor([0, 0])
    config = ak.AEMConfig(beta=2.0, loss_agg_mode="seq-mean-token-sum-norm")
    loss, metrics = ak.fused_linear_aem_policy_loss(hidden, weight, labels, adv, bias=bias, turn_ids=turn_ids,
                                                    response_group=group, old_logprobs=old, config=config,
                                                    backend=backend)
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    logits = hidden @ weight.T + bias
    ref_loss, ref_metrics = ak.aem_policy_loss(logits, labels, adv, turn_ids=turn_ids, response_group=group,
                                               old_logprobs=old, config=config, backend="torch")
    ref_grads = torch.autograd.grad(ref_loss, (hidden, weight, bias))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["aem/weights"], ref_metrics["aem/weights"], rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_fused_linear_loss_errors():
    hidden, weight = torch.randn(6, 8), torch.randn(20, 8)
    labels, adv = torch.randint(0, 20, (6,)), torch.tensor([1.0])
    kw = dict(token_response=torch.zeros(6, dtype=torch.long), response_group=torch.tensor([0]))
    with pytest.raises(ValueError, match="single_pass"):
        ak.fused_linear_aem_policy_loss(hidden, weight, labels, adv, single_pass=True, **kw)
    with pytest.raises(ValueError, match="weight"):
        ak.fused_linear_aem_policy_loss(hidden, weight[:, :5], labels, adv, **kw)
    with pytest.raises(ValueError, match="labels"):
        ak.fused_linear_aem_policy_loss(hidden, weight, labels[:5], adv, **kw)
    with pytest.raises(ValueError, match="token_response"):
        ak.fused_linear_aem_policy_loss(hidden, weight, labels, adv, token_response=torch.zeros(5, dtype=torch.long),
                                        response_group=torch.tensor([0]))
    with pytest.raises(TypeError, match="config"):
        ak.fused_linear_aem_policy_loss(hidden, weight, labels, adv, config={}, **kw)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum-norm", "seq-mean-token-mean"])
def test_fused_linear_loss_takes_the_global_normalisers_and_a_process_group(mode, tmp_path):
    """verl's normalisers and `process_group` reach the fused-linear loss exactly as aem_policy_loss's: the
    same loss and gradients on the materialised logits; a one-rank gloo group changes nothing."""
    import torch.distributed as dist

    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(2, 9, 24, generator=gen, requires_grad=True)
    weight = (torch.randn(301, 24, generator=gen) * 0.3).requires_grad_()
    labels = torch.randint(0, 301, (2, 9), generator=gen)
    mask = torch.tensor([[0, 1, 1, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    adv, group_ids = torch.tensor([0.7, -1.1]), torch.tensor([0, 0])
    config = ak.AEMConfig(beta=1.5, loss_agg_mode=mode)
    norms = dict(dp_size=2, batch_num_tokens=23.0, global_batch_size=5.0, loss_scale_factor=12.0)
    common = dict(response_mask=mask, response_group=group_ids, config=config)
    loss = ak.fused_linear_aem_policy_loss(hidden, weight, labels, adv, backend="torch", **common, **norms)[0]
    grads = torch.autograd.grad(loss, (hidden, weight))
    logits = hidden @ weight.T
    ref_loss = ak.aem_policy_loss(logits, labels, adv, backend="torch", **common, **norms)[0]
    ref_grads = torch.autograd.grad(ref_loss, (hidden, weight))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    alone = ak.aem_policy_loss(logits, labels, adv, backend="torch", **common)[0]
    assert not torch.allclose(alone, ref_loss)  # the normalisers did change the loss

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(TypeError, match="process_group"):
            ak.fused_linear_aem_policy_loss(hidden, weight, labels, adv, process_group="world", **common)
        grouped = ak.fused_linear_aem_policy_loss(hidden, weight, labels, adv, backend="torch",
                                                  process_group=dist.group.WORLD, **common)[0]
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(grouped, alone, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_fused_linear_loss_takes_verls_global_normalisers(mode):
    """dp_size / batch_num_tokens / global_batch_size / loss_scale_factor reach the fused-linear loss (and the
    causal-LM loss, which passes its keywords on) as in aem_policy_loss on the materialised logits."""
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(11, 16, generator=gen, requires_grad=True)
    weight = torch.randn(53, 16, generator=gen, requires_grad=True)
    labels = torch.randint(0, 53, (11,), generator=gen)
    kwargs = dict(token_response=torch.tensor([0, 0, 1, 1, 1, -1, 2, 2, 3, 3, 3]),
                  response_group=torch.tensor([0, 0, 1, 1]), old_logprobs=-torch.rand(11, generator=gen) * 3,
                  config=ak.AEMConfig(loss_agg_mode=mode, surprisal_source="old", uncertainty="surprisal"),
                  dp_size=2, batch_num_tokens=37, global_batch_size=9, loss_scale_factor=7.0)
    adv = torch.tensor([1.0, -0.5, 0.3, -1.2])
    loss, metrics = ak.fused_linear_aem_policy_loss(hidden, weight, labels, adv, backend="cpu", **kwargs)
    ref_loss, ref_metrics = ak.aem_policy_loss(hidden @ weight.T, labels, adv, backend="torch", **kwargs)
    local, _ = ak.aem_policy_loss(hidden @ weight.T, labels, adv, backend="torch",
                                  **{k: v for k, v in kwargs.items() if k not in ("dp_size", "batch_num_tokens",
                                                                                   "global_batch_size",
                                                                                   "loss_scale_factor")})
    assert not torch.allclose(local, ref_loss)  # the normalisers change the loss: the comparison can fail
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["actor/pg_loss"], ref_metrics["actor/pg_loss"], rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(loss, (hidden, weight))
    for g, r in zip(grads, torch.autograd.grad(ref_loss, (hidden, weight))):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="dp_size"):
        ak.fused_linear_aem_policy_loss(hidden, weight, labels, adv, **{**kwargs, "dp_size": 0})
    with pytest.raises(TypeError, match="ProcessGroup"):
        ak.fused_linear_aem_policy_loss(hidden, weight, labels, adv, process_group="dp",
                                        **{k: v for k, v in kwargs.items() if k != "dp_size"})
