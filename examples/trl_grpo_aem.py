"""GRPO + AEM with TRL on CPU in a few minutes: a tiny Qwen2 built from a config, a word-level tokenizer
built locally (no download) and a toy reward. Needs `pip install aem-kernels[trl,train]` (from a checkout:
`PYTHONPATH=. python examples/trl_grpo_aem.py`).

    python examples/trl_grpo_aem.py                  # 30 steps, beta = 1 (~2 min on 2 CPU cores)
    python examples/trl_grpo_aem.py --beta 0         # plain GRPO: trl.GRPOTrainer up to fp32 rounding

The task: after a prompt of colour words, say "yes" as often as possible in at most 8 words; every other
word costs a little. Each logged step prints TRL's reward and entropy next to AEM's weight spread
(aem/w_std) and the predicted entropy drift of eq. 6 with and without the modulation.
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")  # no GPU: the Triton kernels (if reached) run interpreted

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import PrinterCallback  # noqa: E402
from trl import GRPOConfig  # noqa: E402

import aem_kernels as ak  # noqa: E402
from aem_kernels.integrations.trl import AEMGRPOTrainer  # noqa: E402
from aem_kernels.train.model import ModelSpec, build_policy  # noqa: E402
from aem_kernels.train.tokenizer import WordTokenizer  # noqa: E402

WORDS = "red green blue yellow black white yes no maybe".split()
COLOURS = WORDS[:6]


def toy_reward(completions, **_):
    """+1 per "yes", -0.1 per other word."""
    return [sum(1.0 if w == "yes" else -0.1 for w in text.split()) for text in completions]


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--beta", type=float, default=1.0, help="AEM strength (0: plain GRPO)")
    parser.add_argument("--uncertainty", choices=("entropy", "surprisal"), default="entropy")
    parser.add_argument("--loss-type", default="dapo", help="any TRL GRPO loss_type")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    tokenizer = WordTokenizer(WORDS)
    model = build_policy(ModelSpec(hidden_size=64, num_layers=2), len(tokenizer), tokenizer.pad_id,
                         tokenizer.bos_id, tokenizer.end_id, seed=args.seed)
    prompts = [" ".join(COLOURS[(i + k) % len(COLOURS)] for k in range(3)) for i in range(len(COLOURS))]
    dataset = Dataset.from_dict({"prompt": prompts * 50})
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=8, num_generations=4,
            max_completion_length=8, learning_rate=3e-3, loss_type=args.loss_type, logging_steps=1,
            report_to=[], use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True, seed=args.seed)
        trainer = AEMGRPOTrainer(model=model, reward_funcs=toy_reward, args=config, train_dataset=dataset,
                                 processing_class=tokenizer.hf,
                                 aem_config=ak.AEMConfig(beta=args.beta, uncertainty=args.uncertainty))
        trainer.remove_callback(PrinterCallback)  # the table below instead of one dict per step
        trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    print(f"{'step':>4} {'reward':>8} {'entropy':>8} {'aem/w_std':>10} {'aem/drift':>10} {'unmodulated':>12}")
    for step, h in enumerate(logs, 1):
        print(f"{step:>4} {float(h['reward']):>8.3f} {float(h['entropy']):>8.3f} {float(h['aem/w_std']):>10.4f} "
              f"{float(h['aem/drift']):>10.5f} {float(h['aem/drift_unmodulated']):>12.5f}")
    return logs


if __name__ == "__main__":
    main()
