"""torch.distributed: the rollout corrections, the top-entropy token mask and the adaptive entropy coefficient
with a process group equal one process holding the whole batch (2 gloo CPU processes, each with its own rows)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import aem_kernels as ak
from aem_kernels.loss.corrections import apply_rollout_corrections, entropy_token_mask
from aem_kernels.loss.inputs import loss_batch
from distributed_harness import Checks, Mismatches, assert_check_passed

WORLDS = (2,)
CHECKS = Checks(__name__)
ROWS, T, V = 8, 7, 5


def _whole(seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(ROWS, T, generator=g) > 0.25
    mask[3] = False                           # an empty response
    old = -2 * torch.rand(ROWS, T, generator=g, dtype=torch.float64)
    rollout = old + 0.3 * torch.randn(ROWS, T, generator=g, dtype=torch.float64)
    entropy = 3 * torch.rand(ROWS, T, generator=g)
    return mask, old, rollout, entropy


def _batch(config, mask, old, rollout, group):
    rows = mask.shape[0]
    return loss_batch(torch.empty(rows, T, V), torch.zeros(rows, T, dtype=torch.long), torch.randn(rows), config,
                      response_group=torch.zeros(rows, dtype=torch.long), response_mask=mask, old_logprobs=old,
                      rollout_logprobs=rollout, num_groups=1, process_group=group)


@CHECKS.register(worlds=WORLDS)
def corrections_over_ranks(rank, world):
    m = Mismatches()
    mask, old, rollout, entropy = _whole()
    rows = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
    group = dist.group.WORLD
    for kwargs in (dict(rollout_is="token", rollout_is_batch_normalize=True, rollout_rs="seq_mean_k3",
                        rollout_rs_threshold=0.05),
                   dict(rollout_is="sequence", rollout_is_threshold="0.5_3", rollout_is_batch_normalize=True),
                   dict(vllm_importance_sampling_mode="sequence_truncate", vllm_importance_sampling_clip_min=0.5)):
        config = ak.AEMConfig(top_entropy_quantile=0.3, **kwargs)
        whole, w_whole, met_whole = apply_rollout_corrections(_batch(config, mask, old, rollout, None), config)
        part, w_part, met_part = apply_rollout_corrections(
            _batch(config, mask[rows], old[rows], rollout[rows], group), config)
        name = next(iter(kwargs.values()))
        m.close(f"{name}: weights", w_part, w_whole.reshape(ROWS, T)[rows].reshape(-1), atol=1e-12, rtol=1e-7)
        m.true(f"{name}: kept tokens", torch.equal(part.token_response >= 0,
                                                   (whole.token_response >= 0).reshape(ROWS, T)[rows].reshape(-1)))
        m.true(f"{name}: metric names", set(met_part) == set(met_whole))
        for key in met_whole:
            m.close(f"{name}: {key}", met_part[key], met_whole[key], atol=1e-12, rtol=1e-7)
        kept = entropy_token_mask(entropy[rows].reshape(-1), part, config)
        kept_whole = entropy_token_mask(entropy.reshape(-1), whole, config).reshape(ROWS, T)
        m.true(f"{name}: entropy mask", torch.equal(kept, kept_whole[rows].reshape(-1)))

    ctrl, ctrl_whole = ak.AdaptiveEntropyCoefficient(entropy_target=1.5), ak.AdaptiveEntropyCoefficient(
        entropy_target=1.5)
    ctrl.observe(entropy[rows], mask[rows])
    ctrl_whole.observe(entropy, mask)
    ctrl.step(process_group=group)
    ctrl_whole.step()
    m.close("adaptive entropy: world entropy", ctrl.last_world_entropy, ctrl_whole.last_world_entropy, atol=1e-12)
    m.raise_if_any()


@pytest.mark.parametrize("world, name", CHECKS.cases(WORLDS))
def test_corrections_distributed(world, name, tmp_path_factory):
    assert_check_passed(CHECKS, world, name, tmp_path_factory)
