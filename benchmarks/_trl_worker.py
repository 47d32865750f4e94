"""TRL's GRPOTrainer side of ``vs_trl.py``: run inside the TRL environment that script builds (never imported by
the package). One process, or one rank of ``torchrun`` (Accelerate, inside the Trainer, reads torchrun's
rank variables and uses gloo on the CPU).

    python _trl_worker.py --model DIR --steps N --batch 32 --max-new-tokens 24 --out result.json

Trains ``--steps`` optimizer steps of GRPO (beta 0.04, so a reference-model forward too) on the pointwise reward
"the completion contains ``def ``", from the BOS token alone (f-DPG's unconditional demo samples from BOS too):
``--batch`` completions per optimizer step over all ranks, ``--group`` completions per prompt, at most
``--max-new-tokens`` new tokens at temperature 1, no top-k/top-p. Rank 0 writes {step_s: [wall seconds of each
optimizer step, from the end of the previous one], tokens: [generated tokens of each step, all ranks]}.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--batch", type=int, default=32, help="completions per optimizer step, all ranks")
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="completions per forward/backward on one rank (default: the rank's whole share)")
    ap.add_argument("--group", type=int, default=8, help="completions per prompt (GRPO's num_generations)")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--out", required=True)
    ap.add_argument("--workdir", required=True)
    args = ap.parse_args()

    import datasets
    import pyarrow as pa
    import torch
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    world = int(os.environ.get("WORLD_SIZE", 1))
    share = args.batch // world
    micro = args.micro_batch or share
    if share * world != args.batch or share % micro:
        raise SystemExit(f"--batch {args.batch} must split into {world} ranks of whole micro-batches of {micro}")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    bos = tokenizer.bos_token or tokenizer.eos_token
    n_prompts = (args.steps + 2) * args.batch // args.group
    # An explicit fingerprint: datasets would otherwise hash the table with dill, which fails on this stack.
    dataset = datasets.Dataset(pa.table({"prompt": [bos] * n_prompts}), fingerprint="vs-trl-bos-prompts")

    tokens: list[int] = []

    def contains_def(completions, completion_ids=None, **_):
        tokens.append(sum(len(c) for c in completion_ids) if completion_ids is not None else 0)
        return [1.0 if "def " in c else 0.0 for c in completions]

    class StepClock(TrainerCallback):
        def __init__(self):
            self.last, self.step_s = None, []

        def on_step_begin(self, *_, **__):
            if self.last is None:
                self.last = time.perf_counter()

        def on_step_end(self, *_, **__):
            now = time.perf_counter()
            self.step_s.append(now - self.last)
            self.last = now

    config = GRPOConfig(
        output_dir=args.workdir, max_steps=args.steps, per_device_train_batch_size=micro,
        gradient_accumulation_steps=share // micro, num_generations=args.group,
        max_completion_length=args.max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, beta=0.04,
        learning_rate=args.lr, use_cpu=True, bf16=False, save_strategy="no", report_to="none", logging_steps=1,
        seed=0, disable_tqdm=True,
        # TRL 1.16 turns activation checkpointing on by default; fdpg-scale's demo does not checkpoint, and the
        # recomputation would cost TRL a forward per step.
        gradient_checkpointing=False)
    clock = StepClock()
    trainer = GRPOTrainer(model=args.model, reward_funcs=[contains_def], args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[clock])
    trainer.train()
    # The reward is computed once per step and rank, on the rank's whole share; the step's tokens sum the ranks.
    if len(tokens) != args.steps:
        raise SystemExit(f"the reward ran {len(tokens)} times in {args.steps} steps: one generation per step expected")
    per_step = torch.tensor(tokens, dtype=torch.float64)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(per_step)
    rank = int(os.environ.get("RANK", 0))
    if rank == 0:
        Path(args.out).write_text(json.dumps({"step_s": clock.step_s, "tokens": per_step.tolist(), "world": world}))


if __name__ == "__main__":
    main()
