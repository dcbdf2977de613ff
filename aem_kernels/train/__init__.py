"""The reference trainer: multi-turn agent RL on a small `transformers` model: GRPO, GRPO+AEM, and the
baselines GRPO+entropy bonus and GRPO+clip-higher.

Everything AEM-specific goes through the package's public API (`ak.aem_policy_loss`, `ak.AEMConfig`,
`ak.logprobs_and_entropy`, `ak.response_entropy`, `ak.logprobs_from_logits`); the rest is a plain loop users
can copy. Modules, in the order a step uses them:

    envs/       text environments with outcome rewards (household: ALFWorld-like, shop: WebShop-like,
                safe: probe before answering, actions of 3-6 tokens)
    tokenizer   word-level tokenizer built from an environment's words
    model       the Qwen2-style policy built from a config, and the KV-cache forward helper
    warmstart   supervised warm start on noisy scripted demonstrations
    rollout     batched multi-turn sampling with a KV cache (G trajectories per task instance)
    batching    trajectories -> token_response / response_group / advantages (turn or trajectory level)
    algorithm   the methods' AEMConfigs, GRPO advantages, the PPO update through ak.aem_policy_loss, and the
                measured entropy change of an update (the drift meter's check)
    loop        one run (metrics as JSONL); runner: many runs; cli: the command line
    progress    tqdm bars on a terminal, a few summary lines in a log; requirements: each command's modules
    plots, summary, stats   figures, the markdown tables, and the comparison's statistics

Command line: `python -m aem_kernels.train --help`.
"""

from .algorithm import METHODS, grpo_advantages, loss_config
from .batching import PolicyBatch, build_policy_batch
from .config import PRESETS, TrainConfig, preset
from .envs import ENVS, make_env
from .loop import train
from .rollout import Trajectory, Turn, rollout

__all__ = ["ENVS", "METHODS", "PRESETS", "PolicyBatch", "TrainConfig", "Trajectory", "Turn", "build_policy_batch",
           "grpo_advantages", "loss_config", "make_env", "preset", "rollout", "train"]
