"""Train disco's f-DPG tuner on a pointwise "contains SUBSTRING" constraint: run by benchmarks/vs_disco.py with
the Python of disco's own environment (never the project's: disco is installed only there, and nothing of
fdpg_scale is importable here).

    python _disco_worker.py --model DIR --divergence kl --lr 3e-5 --steps 60 --batch 32 --micro-batch 16 \
        --warmup 2 --proposal-interval 8 --window 256 --max-new-tokens 24 --seed 0 --save-steps 30 60 --out RUN

Saves the policy as a Hugging Face model (with the base's own tokenizer files) in ``RUN/step_<k>`` for every
``k`` in ``--save-steps`` and writes ``RUN/disco.json``: the steps' wall-clock time, the tokens sampled, the
proposal updates and disco's version.

The target is disco's own EBM, the base times a ``BooleanScorer``; the sampling and the empty context follow
disco's conventions (an empty context is the BOS token's text, which ``sample_batch`` does not add itself).
Two adaptations make disco 1.1.2 run here: ``patch_disco`` (its offline proposal check) and building the
``Tuner`` directly instead of ``FDPGTuner`` (see ``main``). Both are this file's own code, not disco's.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

#: The files that make a Hugging Face tokenizer, copied from the base next to each saved policy so that the
#: evaluation reads exactly the base's tokenizer (disco may set a pad token on its in-memory copy).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


def patch_disco() -> None:
    """Fix disco 1.1.2's offline proposal check, which cannot run as released.

    ``Tuner._update_proposal_if_better`` hands one ``WindowedMovingAverage`` (the rolling estimate of
    D(p‖q) or D(p‖π)) to ``disco.utils.moving_average.average``, which expects a dict of them (it calls
    ``.items()``) and raises AttributeError at the first check. The estimate of one window is the average
    itself, so the replacement returns its ``value`` and keeps the dict form for every other caller.
    """
    import disco.tuners.tuner as tuner_module

    dict_average = tuner_module.average

    def average(estimates):
        return dict_average(estimates) if hasattr(estimates, "items") else estimates.value

    tuner_module.average = average


def generated_tokens(token_ids, eos_id: int, pad_id: int | None) -> int:
    """Tokens of one generated sample [T] up to and including its first EOS, padding excluded (what a sampler
    must have produced; the count behind tokens/s)."""
    ids = token_ids.tolist()
    if eos_id in ids:
        ids = ids[:ids.index(eos_id) + 1]
    return sum(1 for t in ids if t != pad_id or t == eos_id)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="the base model's directory (also the initial policy)")
    ap.add_argument("--divergence", choices=("kl", "js", "tv"), required=True)
    ap.add_argument("--substring", default="def ", help="the constraint: the sample's text contains it")
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True, help="samples per gradient step")
    ap.add_argument("--micro-batch", type=int, required=True, help="samples per loss computation (scoring_size)")
    ap.add_argument("--warmup", type=int, required=True)
    ap.add_argument("--proposal-interval", type=int, required=True, help="steps between proposal checks")
    ap.add_argument("--window", type=int, required=True, help="samples in the rolling D(p‖·) estimates")
    ap.add_argument("--max-new-tokens", type=int, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--save-steps", type=int, nargs="+", required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    import disco
    from disco.distributions import LMDistribution
    from disco.scorers import BooleanScorer
    from disco.tuners import Tuner
    from disco.tuners.losses import JSLoss, KLLoss, TVLoss

    patch_disco()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    model = str(args.model)
    base = LMDistribution(model=model, length=args.max_new_tokens, device="cpu")
    proposal = LMDistribution(model=model, length=args.max_new_tokens, device="cpu")
    policy = LMDistribution(model=model, length=args.max_new_tokens, device="cpu", freeze=False)
    substring = args.substring
    target = base * BooleanScorer(lambda sample, context: torch.tensor(substring in sample.text))
    loss = {"kl": KLLoss, "js": JSLoss, "tv": TVLoss}[args.divergence]()
    tokenizer = policy.tokenizer
    # disco's FDPGTuner (its one-context front end) passes a ``context_distribution`` that 1.1.2's Tuner no
    # longer accepts; the Tuner it wraps, given the single context as a one-item dataset, is the same algorithm.
    tuner = Tuner(policy, target, proposal=proposal, context_dataset=[tokenizer.bos_token], loss=loss,
                  track_metrics=["kl"], learning_rate=args.lr, n_gradient_steps=args.steps,
                  n_samples_per_context=args.batch, n_contexts_per_step=1, sampling_size=args.batch,
                  scoring_size=args.micro_batch, warmup_steps=args.warmup, scheduler="constant",
                  proposal_update_interval=args.proposal_interval, proposal_update_metric="kl",
                  estimates_rolling_window_size=args.window, validate_on_start=False)

    counts = {"tokens": 0, "samples": 0, "proposal_updates": 0}
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id

    def count(context, samples, *scores):
        counts["samples"] += len(samples)
        counts["tokens"] += sum(generated_tokens(s.token_ids, eos_id, pad_id) for s in samples)

    def on_metric(name, value):
        if name == "proposal_updated":
            counts["proposal_updates"] += int(value)

    saved, save_seconds = [], 0.0

    def save(step: int) -> None:
        nonlocal save_seconds
        start = time.perf_counter()
        directory = args.out / f"step_{step}"
        policy.model.save_pretrained(directory)
        for name in TOKENIZER_FILES:
            if (args.model / name).is_file():
                shutil.copy(args.model / name, directory / name)
        saved.append(step)
        save_seconds += time.perf_counter() - start

    def on_step(step_index: int) -> None:   # dispatched before step ``step_index``: ``step_index`` steps are done
        if step_index in args.save_steps:
            save(step_index)

    tuner.eval_samples_updated.enroll(count)
    tuner.metric_updated.enroll(on_metric)
    tuner.step_idx_updated.enroll(on_step)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tuner.tune()
    seconds = time.perf_counter() - start - save_seconds
    if args.steps in args.save_steps:
        save(args.steps)
    record = {"disco_version": getattr(disco, "__version__", "unknown"), "train_seconds": seconds,
              "anomaly_detection": torch.is_anomaly_enabled(), **counts, "saved_steps": saved}
    (args.out / "disco.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
