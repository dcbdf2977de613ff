"""TRL 1.16.0 integration: `AEMGRPOTrainer`, a `trl.GRPOTrainer` with AEM advantage modulation.

    trainer = AEMGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...,
                             processing_class=tokenizer, aem_config=ak.AEMConfig(beta=1.0))

What changes against `GRPOTrainer` (everything else, every `loss_type` included, is TRL's own code):

* Advantages (AEM_SPEC eq. 7). After TRL has scored a generation batch (`_generate_and_score_completions`),
  one no-grad forward of the policy gives each local completion's uncertainty x_r (mean token entropy by
  default, or surprisal; for surprisal TRL's old log-probs are reused when it computed them) over the
  completion's loss-mask tokens. x is gathered across processes exactly as TRL gathers the rewards, so a
  group (the `num_generations` consecutive completions of one prompt in the global batch, TRL's
  `view(-1, num_generations)`) is whole even when its completions sit on several processes;
  `modulate_advantages` rescales the global advantages and each process keeps its own slice. The policy at
  generation time is the rollout policy, so this is AEM's "old" uncertainty, which equals the current one on
  the first of `num_iterations` updates.
* Per-token log-probs and entropies (`token_ops="aem_kernels"`, the default): the policy's logits of the
  completion positions go through `logprobs_and_entropy` (one read of the logits, section-6 backward)
  instead of TRL's chunked fused LM head. This materialises the [B, T, V] completion logits that TRL's head
  avoids; `token_ops="trl"` keeps TRL's head (AEM modulation only). Multimodal inputs always use TRL's head.
* Metrics: aem/x_mean, aem/x_std, aem/u_mean, aem/u_std, aem/w_mean, aem/w_std, aem/clip_frac, aem/drift and
  aem/drift_unmodulated join TRL's logs (one value per generation batch, averaged like TRL's metrics).
"""

from __future__ import annotations

from typing import Any, Dict

import torch

from . import require_framework

require_framework("trl", "trl", "trl==1.16.0")

from trl import GRPOTrainer  # noqa: E402

from ..config import AEMConfig  # noqa: E402
from ..loss import modulate_advantages  # noqa: E402
from ..ops.logprobs import logprobs_and_entropy  # noqa: E402

__all__ = ["AEMGRPOTrainer", "TOKEN_OPS"]

TOKEN_OPS = ("aem_kernels", "trl")
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                    "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


class AEMGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` whose group advantages are modulated by AEM (see the module docstring).

    Args:
        *args, **kwargs: those of `trl.GRPOTrainer`.
        aem_config: `AEMConfig`; its modulation fields (beta, phi, sign, uncertainty, surprisal_reduction,
            baseline, zscore, normalize, w_min, w_max) are used. The surrogate, clipping, KL and aggregation
            stay TRL's (`GRPOConfig`). beta=0 trains like `GRPOTrainer`: bit for bit with token_ops="trl",
            within the package's accuracy rule with its token ops.
        token_ops: "aem_kernels" (per-token log-probs/entropies through this package) or "trl" (TRL's head).
    """

    def __init__(self, *args: Any, aem_config: AEMConfig = AEMConfig(), token_ops: str = "aem_kernels",
                 **kwargs: Any) -> None:
        if not isinstance(aem_config, AEMConfig):
            raise TypeError(f"aem_config must be an aem_kernels.AEMConfig, got {type(aem_config).__name__}")
        if token_ops not in TOKEN_OPS:
            raise ValueError(f"token_ops must be one of {TOKEN_OPS}, got {token_ops!r}")
        self.aem_config = aem_config
        self.token_ops = token_ops
        super().__init__(*args, **kwargs)

    # -- per-token log-probs and entropies ------------------------------------------------------------------
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        if self.token_ops == "trl" or compute_aux_loss or any(v is not None for v in multimodal.values()):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **multimodal)
        batch_size = batch_size or input_ids.size(0)
        all_logps, all_entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids = input_ids[start:start + batch_size]
            mask = attention_mask[start:start + batch_size]
            with self.accelerator.autocast():
                # logits of the positions that predict the last `logits_to_keep` tokens (a view, no copy)
                logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=logits_to_keep + 1,
                               use_cache=False).logits[:, :-1]
            labels = ids[:, -logits_to_keep:].masked_fill(mask[:, -logits_to_keep:] == 0, -100)
            logps, entropy = logprobs_and_entropy(logits, labels, temperature=self.temperature, ignore_index=-100)
            all_logps.append(logps)
            all_entropies.append(entropy)
        entropies = torch.cat(all_entropies, dim=0) if compute_entropy else None
        return torch.cat(all_logps, dim=0), entropies, None

    # -- advantages --------------------------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        return self._aem_modulate(super()._generate_and_score_completions(inputs))

    def _aem_uncertainty(self, output: Dict[str, Any]) -> tuple:
        """Per-token uncertainty values [B, T] and the loss mask [B, T] of the local completions (no grad)."""
        completion_mask = output["completion_mask"]
        loss_mask = completion_mask if "tool_mask" not in output else completion_mask * output["tool_mask"]
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], completion_mask], dim=1)
        if self.aem_config.uncertainty == "surprisal" and output.get("old_per_token_logps") is not None:
            return -output["old_per_token_logps"].float(), loss_mask  # TRL already scored them: no forward
        multimodal = {key: output.get(key) for key in _MULTIMODAL_KEYS}
        mode = "train" if self.model.training else "eval"
        args = self.args
        batch_size = args.per_device_train_batch_size if mode == "train" else args.per_device_eval_batch_size
        with torch.no_grad():
            logps, entropies, _ = self._get_per_token_logps_and_entropies(
                self.model, input_ids, attention_mask, completion_mask.size(1), batch_size=batch_size,
                compute_entropy=self.aem_config.uncertainty == "entropy", **multimodal)
        values = entropies if self.aem_config.uncertainty == "entropy" else -logps
        return values.float(), loss_mask

    def _aem_local_stats(self, output: Dict[str, Any]) -> tuple:
        """This process's (x [B] uncertainty per completion, trained-token count [B], advantages [B])."""
        values, loss_mask = self._aem_uncertainty(output)
        mask = loss_mask.to(values.dtype)
        lengths = mask.sum(dim=1)
        per_row = (values * mask).sum(dim=1)
        x = per_row / lengths.clamp(min=1) if self.aem_config.surprisal_reduction == "mean" else per_row
        return x, lengths, output["advantages"].float()

    def _aem_modulate(self, output: Dict[str, Any]) -> Dict[str, Any]:
        """Modulate `output["advantages"]` (this process's [B] slice) by eq. 7 over whole groups."""
        mode = "train" if self.model.training else "eval"
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        # Gathered like TRL's rewards, in process order: row i of the global batch is completion i, and the
        # num_generations consecutive rows of one prompt form its group wherever they were generated.
        x, lengths, advantages = (self.accelerator.gather(t) for t in self._aem_local_stats(output))
        if advantages.numel() % num_generations:
            raise ValueError(f"the global batch ({advantages.numel()} completions) is not a whole number of groups "
                             f"of num_generations={num_generations}")
        groups = torch.arange(advantages.numel(), device=advantages.device) // num_generations
        modulated, metrics = modulate_advantages(advantages, x, groups, self.aem_config, response_valid=lengths > 0,
                                                 num_groups=advantages.numel() // num_generations)
        local = output["advantages"].numel()
        start = self.accelerator.process_index * local
        output["advantages"] = modulated[start:start + local].to(output["advantages"].dtype)
        for name, value in metrics.items():
            if value.dim() == 0:
                self._metrics[mode][name].append(value.item())
        return output
