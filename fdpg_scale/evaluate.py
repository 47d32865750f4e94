"""Evaluate a trained policy against its target and its base model, by plain Monte Carlo in one process.

``fdpg-scale eval OUTPUT_DIR`` exports the run's latest checkpoint, then draws ``n`` sequences from the
policy π and ``n`` from the base model a (temperature 1, no truncation: the models themselves) and reports:

- ``alignment`` = E_π[φ] (φ = b for a pointwise task, r for a reward, the feature for a distributional one),
  a plain sample mean over π's samples;
- ``kl_pi_a`` = KL(π‖a) = E_π[log π − log a];
- ``kl_p_pi`` = KL(p‖π), by importance sampling from the base: p/a = s(x)/Z with s the target's score
  (p ≪ a always holds, which is why a and not π is the proposal here), Z = E_a[s] estimated on the same draws;
- diversity of π's samples: Distinct-1/2 and Self-BLEU-3 (lower = more diverse).
The same columns for the base model itself give the reference row (alignment before training, KL(p‖a)).
Results go to ``OUTPUT_DIR/eval.json``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from .config import RunConfig, load_config
from .kernels import token_logprobs
from .metrics import distinct_n, self_bleu
from .samples import Samples
from .tasks import Task, build_task

__all__ = ["evaluate_run", "sample_and_score", "main"]


class ConstraintNeverSatisfied(ValueError):
    """No base sample has a positive target score: Z cannot be estimated (the task is unreachable as posed)."""


@torch.no_grad()
def sample_and_score(model, tokenizer, task: Task, *, n: int, max_new_tokens: int, seed: int,
                     batch_size: int = 64) -> dict:
    """Draw ``n`` sequences from ``model`` (from BOS, temperature 1) and score them.

    Returns {"samples": Samples, "logp": [n] log model(x), "log_scores": [n], "feature": [n]}.
    """
    ids, masks, logps = [], [], []
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            prompt = torch.full((b, 1), tokenizer.bos_token_id, dtype=torch.long)
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0,
                                 top_k=0, top_p=1.0, max_new_tokens=max_new_tokens, min_new_tokens=0,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            gen = torch.full((b, max_new_tokens), tokenizer.pad_token_id, dtype=torch.long)
            gen[:, :out.shape[1] - 1] = out[:, 1:]
            # Generated tokens up to and including the first EOS.
            is_eos = gen == tokenizer.eos_token_id
            after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
            mask = ~after_eos & (torch.arange(max_new_tokens) < out.shape[1] - 1)
            ids.append(gen)
            masks.append(mask)
            logps.append(sequence_logprob(model, gen, mask, bos_id=tokenizer.bos_token_id))
    finally:
        torch.random.set_rng_state(generator_state)
    token_ids, mask = torch.cat(ids), torch.cat(masks)
    texts = tokenizer.batch_decode(token_ids.masked_fill(~mask, tokenizer.pad_token_id), skip_special_tokens=True)
    samples = Samples(token_ids=token_ids, mask=mask, texts=texts)
    return {"samples": samples, "logp": torch.cat(logps), "log_scores": task.target.log_scores(samples),
            "feature": task.feature(samples).to(torch.float64)}


@torch.no_grad()
def sequence_logprob(model, generated: torch.Tensor, mask: torch.Tensor, *, bos_id: int) -> torch.Tensor:
    """[B] Σ_t log model(x_t | BOS, x_<t) over ``mask`` for generated tokens [B, T] (continuations of BOS)."""
    inputs = torch.cat([torch.full((generated.shape[0], 1), bos_id, dtype=torch.long), generated], dim=1)
    logits = model(inputs, attention_mask=torch.ones_like(inputs)).logits[:, :-1].float()
    targets = generated.masked_fill(~mask, -100)
    return token_logprobs(logits, targets).to(torch.float64).sum(-1)


def _row(policy: dict, base: dict, *, log_z: float, pi_on_base: torch.Tensor) -> dict:
    """Metrics of one model from its own draws (``policy``) and the base draws (for KL(p‖model))."""
    seqs = policy["samples"].sequences()
    w = torch.exp(base["log_scores"].to(torch.float64) - log_z)               # p/a on the base draws
    log_p = base["logp"] + base["log_scores"].to(torch.float64) - log_z
    kl_terms = torch.where(w > 0, w * (log_p - pi_on_base), torch.zeros_like(w))
    return {
        "alignment": float(policy["feature"].mean()),
        "alignment_se": float(policy["feature"].std() / math.sqrt(len(seqs))),
        "kl_p_pi": float(kl_terms.mean()), "kl_p_pi_se": float(kl_terms.std() / math.sqrt(len(seqs))),
        "kl_pi_a": float((policy["logp"] - policy["logp_base"]).mean()),
        "distinct_1": distinct_n(seqs, 1), "distinct_2": distinct_n(seqs, 2),
        "self_bleu_3": self_bleu(seqs, 3, max_hypotheses=min(len(seqs), 100)),
        "mean_length": float(policy["samples"].lengths.float().mean()),
    }


def evaluate_run(output_dir: str | Path, *, n: int = 256, seed: int = 1234) -> dict:
    """Evaluate run ``output_dir`` (its config.yaml and latest checkpoint) → {"base": row, "policy": row}."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .checkpoint import find_latest
    from .export import export_checkpoint

    output_dir = Path(output_dir)
    cfg: RunConfig = load_config(output_dir / "config.yaml")
    ckpt = find_latest(output_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{output_dir} has no checkpoint to evaluate (looked in {output_dir / 'checkpoints'})")
    hf_dir = output_dir / "eval" / ckpt.name
    if not (hf_dir / "config.json").is_file():
        export_checkpoint(ckpt, hf_dir)
    task = build_task(cfg.target)
    if task.moment is not None:
        state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        task = task.with_lambdas(state["lambdas"])
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    policy_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    base_model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32).eval()
    max_new = cfg.sampling.max_new_tokens

    base = sample_and_score(base_model, tokenizer, task, n=n, max_new_tokens=max_new, seed=seed)
    policy = sample_and_score(policy_model, tokenizer, task, n=n, max_new_tokens=max_new, seed=seed + 1)
    s = base["samples"]
    base["logp_base"] = base["logp"]
    policy["logp_base"] = sequence_logprob(base_model, policy["samples"].token_ids, policy["samples"].mask,
                                           bos_id=tokenizer.bos_token_id)
    pi_on_base = sequence_logprob(policy_model, s.token_ids, s.mask, bos_id=tokenizer.bos_token_id)

    scores = base["log_scores"].to(torch.float64)
    if not bool(torch.isfinite(scores).any()):
        raise ConstraintNeverSatisfied(
            f"the target's constraint holds on 0/{n} base samples (rate 0): Z cannot be estimated; "
            f"loosen target.scorer_args or raise sampling.max_new_tokens")
    log_z = float(torch.logsumexp(scores, 0) - math.log(n))                      # log E_a[s]
    result = {"checkpoint": str(ckpt), "n": n, "log_z": log_z,
              "base": _row(base, base, log_z=log_z, pi_on_base=base["logp"]),
              "policy": _row(policy, base, log_z=log_z, pi_on_base=pi_on_base),
              "divergence": str(cfg.divergence.name if cfg.divergence.alpha is None
                                else f"alpha({cfg.divergence.alpha:g})"),
              "samples": policy["samples"].texts[:8]}
    (output_dir / "eval.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fdpg-scale eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", help="a run's output_dir (config.yaml and checkpoints/)")
    parser.add_argument("--samples", type=int, default=256, help="sequences drawn from each model (default 256)")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    r = evaluate_run(args.output_dir, n=args.samples, seed=args.seed)
    keys = ("alignment", "kl_p_pi", "kl_pi_a", "distinct_1", "distinct_2", "self_bleu_3")
    print("| model | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for name in ("base", "policy"):
        print(f"| {name} | " + " | ".join(f"{r[name][k]:.4f}" for k in keys) + " |")
    print(f"wrote {Path(args.output_dir) / 'eval.json'}")
    return 0
