"""Evaluate a trained policy against its target and its base model, by plain Monte Carlo in one process.

``fdpg-scale eval OUTPUT_DIR`` exports the run's latest checkpoint, then draws ``n`` sequences from the
policy π and ``n`` from the base model a (temperature 1, no truncation: the models themselves) and reports:

- ``alignment`` = E_π[φ] (φ = b for a pointwise task, r for a reward, the feature for a distributional one),
  a plain sample mean over π's samples; a target of several scorers gets one ``alignment/<name>`` (and
  ``alignment_se/<name>``) per scorer instead;
- ``kl_pi_a`` = KL(π‖a) = E_π[log π − log a];
- ``kl_p_pi`` = KL(p‖π), by importance sampling from the base: p/a = s(x)/Z with s the target's score
  (p ≪ a always holds, which is why a and not π is the proposal here), Z = E_a[s] estimated on the same draws
  (per context for a conditional target, whose draws cycle through the prompts; averaged over contexts).
  It rests on the base draws with s > 0 only (a rare constraint leaves few of 256): ``n_base`` (default 2048)
  base draws, and ``kl_p_pi_draws`` says how many had s > 0;
- ``kl_gain_rs`` = KL(p‖a) − KL(p‖π) = E_p[log π − log a] (Z cancels), an independent estimate for a pointwise
  constraint (every s ∈ {0, 1}): a second, fresh set of ``n_base`` base draws is rejection-sampled (a draw
  that meets the constraint *is* a draw from p), with its standard error and ``kl_gain_rs_draws``; None for
  other targets;
- diversity of π's samples: Distinct-1/2 and Self-BLEU-3 (lower = more diverse).
The same columns for the base model itself give the reference row (alignment before training, KL(p‖a)).
Results go to ``OUTPUT_DIR/eval.json``.

Seeds: by default the evaluation's draws are seeded from the run's own ``seed`` (``eval_seed``), so runs of
different seeds are evaluated on fresh draws and an interval over seeds includes the evaluation's own variance.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from fdpg_scale.core.logspace import log_mean_exp_groups
from fdpg_scale.core.metrics import diversity_metrics
from fdpg_scale.core.sequences import first_eos_mask, position_ids_from_mask
from fdpg_scale.distributed.generation import pad_prompts
from fdpg_scale.errors import ConfigError, ConstraintNeverSatisfied
from fdpg_scale.kernels.reference import IGNORE_INDEX
from fdpg_scale.kernels import token_logprobs
from fdpg_scale.models.hub import local_dir
from fdpg_scale.models.tokens import padding_id, start_id
from fdpg_scale.training.prompts import PromptSet, load_target_prompts
from fdpg_scale.targets.samples import Samples
from fdpg_scale.targets.tasks import Task, build_task
from fdpg_scale.training.config import RunConfig, load_config
from fdpg_scale.training.alignment import column

__all__ = ["evaluate_run", "evaluate_model", "eval_seed", "sample_and_score", "run", "BASE_SAMPLES"]

#: Generated samples scored per forward pass.
BATCH_SIZE = 64
#: Policy samples quoted in eval.json.
SHOWN_SAMPLES = 8
#: Base draws behind KL(p‖π) and the rejection-sampled gain (a 1-in-30 constraint leaves ~70 of them).
BASE_SAMPLES = 2048
#: Self-BLEU scores at most this many hypotheses (each against all other samples): O(m·N) instead of O(N²).
SELF_BLEU_HYPOTHESES = 100


@torch.no_grad()
def sample_and_score(model, tokenizer, task: Task, *, n: int, max_new_tokens: int, seed: int,
                     prompts: PromptSet | None = None, batch_size: int = BATCH_SIZE) -> dict:
    """Draw ``n`` sequences from ``model`` (temperature 1, no truncation) and score them.

    Unconditional: every draw continues the start token (BOS, else EOS). Conditional (``prompts``): draw i
    continues prompt i mod C, so every context gets n/C draws. Returns {"samples": Samples, "logp": [n] log
    model(x|c), "log_scores": [n], "features": {scorer name: [n]}, "prompt_ids", "prompt_mask" (the
    left-padded contexts, to rescore with another model)}.
    """
    context_ids = torch.arange(n) % (1 if prompts is None else len(prompts))
    pad = padding_id(tokenizer)
    start = start_id(tokenizer)   # BOS, else EOS (models/tokens.py)
    rows = [[start] if prompts is None else list(prompts.token_ids[c]) for c in context_ids.tolist()]
    prompt_ids, prompt_mask = pad_prompts(rows, bos_id=start, pad_id=pad)
    width = prompt_ids.shape[1]
    ids, masks, logps = [], [], []
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for start in range(0, n, batch_size):
            p_ids, p_mask = prompt_ids[start:start + batch_size], prompt_mask[start:start + batch_size]
            out = model.generate(p_ids, attention_mask=p_mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=max_new_tokens, min_new_tokens=0,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
            produced = out.shape[1] - width
            gen = torch.full((p_ids.shape[0], max_new_tokens), pad, dtype=torch.long)
            gen[:, :produced] = out[:, width:]
            produced_mask = (torch.arange(max_new_tokens) < produced).expand_as(gen)
            mask = first_eos_mask(gen, tokenizer.eos_token_id, within=produced_mask)
            ids.append(gen)
            masks.append(mask)
            logps.append(sequence_logprob(model, p_ids, p_mask, gen, mask))
    finally:
        torch.random.set_rng_state(rng_state)
    token_ids, mask = torch.cat(ids), torch.cat(masks)
    texts = tokenizer.batch_decode(token_ids.masked_fill(~mask, pad), skip_special_tokens=True)
    samples = Samples(token_ids=token_ids, mask=mask, texts=texts, context_ids=context_ids,
                      contexts=None if prompts is None else [prompts.texts[c] for c in context_ids.tolist()],
                      metadata=None if prompts is None else prompts.metadata_of(context_ids.tolist()))
    return {"samples": samples, "logp": torch.cat(logps), "log_scores": task.target.log_scores(samples),
            "features": {k: v.to(torch.float64) for k, v in task.features(samples).items()},
            "prompt_ids": prompt_ids, "prompt_mask": prompt_mask}


@torch.no_grad()
def sequence_logprob(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, generated: torch.Tensor,
                     mask: torch.Tensor, *, batch_size: int = BATCH_SIZE) -> torch.Tensor:
    """[B] Σ_t log model(x_t | c, x_<t) over ``mask`` for generated tokens [B, T] continuing the left-padded
    contexts ``prompt_ids`` [B, P] (``prompt_mask`` 1 on real tokens)."""
    out = []
    for start in range(0, generated.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        inputs = torch.cat([prompt_ids[sl], generated[sl]], dim=1)
        attention = torch.cat([prompt_mask[sl], torch.ones_like(generated[sl])], dim=1)
        logits = model(inputs, attention_mask=attention,
                       position_ids=position_ids_from_mask(attention)).logits[:, prompt_ids.shape[1] - 1:-1].float()
        out.append(token_logprobs(logits, generated[sl].masked_fill(~mask[sl], IGNORE_INDEX)).to(torch.float64).sum(-1))
    return torch.cat(out)


def _log_z_per_context(base: dict) -> torch.Tensor:
    """[C] log Ẑ(c) = log mean of s(x) over the base draws of context c (−inf where no draw has s > 0)."""
    ctx = base["samples"].context_ids
    return log_mean_exp_groups(base["log_scores"], ctx, int(ctx.max()) + 1)


def _row(policy: dict, base: dict, *, log_z: torch.Tensor, pi_on_base: torch.Tensor) -> dict:
    """Metrics of one model from its own draws (``policy``) and the base draws (for KL(p‖model)).

    KL(p‖π) is averaged over the contexts whose Ẑ(c) > 0 (all of them for an unconditional target)."""
    seqs = policy["samples"].sequences()
    ctx = base["samples"].context_ids
    lz = log_z[ctx]
    supported = torch.isfinite(lz)
    w = torch.where(supported, torch.exp(base["log_scores"].to(torch.float64) - lz), torch.zeros_like(lz))  # p/a
    log_p = base["logp"] + base["log_scores"].to(torch.float64) - lz
    kl_terms = torch.where(w > 0, w * (log_p - pi_on_base), torch.zeros_like(w))[supported]
    draws = int((w > 0).sum())
    features = policy["features"]
    alignment = {}
    for name, values in features.items():
        alignment[column("alignment", name, len(features))] = float(values.mean())
        alignment[column("alignment_se", name, len(features))] = float(values.std() / math.sqrt(len(seqs)))
    return {
        **alignment,
        "kl_p_pi": float(kl_terms.mean()), "kl_p_pi_se": float(kl_terms.std() / math.sqrt(len(kl_terms))),
        "kl_p_pi_draws": draws,
        "kl_pi_a": float((policy["logp"] - policy["logp_base"]).mean()),
        **diversity_metrics(seqs, distinct=(1, 2), bleu_n=(3,), max_hypotheses=SELF_BLEU_HYPOTHESES),
        "mean_length": float(policy["samples"].lengths.float().mean()),
    }


def eval_seed(run_seed: int) -> int:
    """The evaluation's default seed for a run of seed ``run_seed``: fresh draws per run seed, never the
    training stream's."""
    return 1234 + 7919 * run_seed


def _check_counts(n: int, n_base: int) -> None:
    """ValueError unless both draw counts are ints ≥ 1."""
    for name, value in (("samples", n), ("base samples", n_base)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"eval: {name} must be an int ≥ 1, got {value!r}")


def evaluate_run(output_dir: str | Path, *, n: int = 256, seed: int | None = None,
                 checkpoint: str | Path | None = None, n_base: int = BASE_SAMPLES) -> dict:
    """Evaluate run ``output_dir`` (its config.yaml and latest checkpoint) → {"base": row, "policy": row, ...}.

    n: draws from each model (alignment, KL(π‖a), diversity); n_base: base draws behind KL(p‖π) (and as many
    again for the rejection-sampled ``kl_gain_rs``); seed: None for ``eval_seed`` of the run's seed.
    checkpoint: evaluate this checkpoint directory of the run instead of the latest (for curves over
    training); the result is then returned only, not written to ``eval.json``."""
    from fdpg_scale.distributed.checkpoint import find_latest
    from fdpg_scale.distributed.export import export_checkpoint

    _check_counts(n, n_base)
    output_dir = Path(output_dir)
    cfg: RunConfig = load_config(output_dir / "config.yaml")
    ckpt = find_latest(output_dir) if checkpoint is None else Path(checkpoint)
    if ckpt is None or not ckpt.is_dir():
        raise FileNotFoundError(f"{output_dir} has no checkpoint to evaluate (looked in {output_dir / 'checkpoints'})")
    hf_dir = output_dir / "eval" / ckpt.name
    if not (hf_dir / "config.json").is_file():
        export_checkpoint(ckpt, hf_dir)
    result = {"checkpoint": str(ckpt), **evaluate_model(cfg, hf_dir, n=n, seed=seed, n_base=n_base,
                                                        trainer_state=ckpt / "trainer_state.pt")}
    if checkpoint is None:
        (output_dir / "eval.json").write_text(json.dumps(result, indent=2))
    return result


def evaluate_model(cfg: RunConfig, policy_dir: str | Path, *, n: int = 256, seed: int | None = None,
                   n_base: int = BASE_SAMPLES, trainer_state: str | Path | None = None) -> dict:
    """Evaluate the Hugging Face causal LM saved in ``policy_dir`` as the policy π of run config ``cfg``
    (its base ``model.path``, target and ``sampling.max_new_tokens``) → {"base": row, "policy": row, ...}.

    The evaluation behind ``evaluate_run``, for any model with the base's tokenizer, however it was trained
    (benchmarks/vs_disco.py evaluates another library's tuned model with it). n, n_base, seed: as in
    ``evaluate_run``; trainer_state: a checkpoint's ``trainer_state.pt``, read only for the trained λ of a
    distributional target (required then)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fdpg_scale.distributed.checkpoint_files import load_plain

    _check_counts(n, n_base)
    policy_dir = Path(policy_dir)
    seed = eval_seed(cfg.seed) if seed is None else seed
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    prompts = load_target_prompts(cfg.target, tokenizer)
    task = build_task(cfg.target, metadata_columns=() if prompts is None else tuple(prompts.metadata))  # on the CPU
    if task.moment is not None:
        if trainer_state is None:
            raise ValueError(f"eval: the target of {policy_dir} is distributional: pass the checkpoint's "
                             f"trainer_state.pt (its trained λ)")
        state = load_plain(Path(trainer_state))  # tensors and plain containers only: no pickle runs
        task = task.with_lambdas(state["lambdas"])
    policy_model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    base_dir = local_dir(cfg.model.path, where="model.path")   # a Hub id: its snapshot in the local cache
    base_model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    max_new = cfg.sampling.max_new_tokens

    base = sample_and_score(base_model, tokenizer, task, n=max(n, n_base), max_new_tokens=max_new, seed=seed,
                            prompts=prompts)
    policy = sample_and_score(policy_model, tokenizer, task, n=n, max_new_tokens=max_new, seed=seed + 1,
                              prompts=prompts)
    base["logp_base"] = base["logp"]
    policy["logp_base"] = sequence_logprob(base_model, policy["prompt_ids"], policy["prompt_mask"],
                                           policy["samples"].token_ids, policy["samples"].mask)
    pi_on_base = sequence_logprob(policy_model, base["prompt_ids"], base["prompt_mask"], base["samples"].token_ids,
                                  base["samples"].mask)

    log_z = _log_z_per_context(base)                                             # log E_a[s | c]
    drawn = base["log_scores"].shape[0]
    satisfied = int(torch.isfinite(base["log_scores"]).sum())
    if satisfied == 0:
        raise ConstraintNeverSatisfied(
            f"the target's constraint holds on 0/{drawn} base samples (rate 0): Z cannot be estimated; "
            f"loosen target.scorer_args or raise sampling.max_new_tokens")
    # The base row is scored on the policy-sized share of the base draws (its alignment and diversity compare
    # with π's n draws); KL(p‖a) uses them all, like KL(p‖π).
    base_row = _row(_first(base, n), base, log_z=log_z, pi_on_base=base["logp"])
    return {"policy_dir": str(policy_dir), "n": n, "n_base": drawn, "seed": seed,
            "log_z": float(log_z[torch.isfinite(log_z)].mean()),
            "base_satisfaction_rate": satisfied / drawn,
            "contexts_with_support": f"{int(torch.isfinite(log_z).sum())}/{len(log_z)}",
            "base": base_row,
            "policy": _row(policy, base, log_z=log_z, pi_on_base=pi_on_base),
            **_rejection_sampled_gain(policy_model, base_model, tokenizer, task, n=drawn, max_new_tokens=max_new,
                                      seed=seed + 2, prompts=prompts),
            "divergence": str(cfg.divergence.name if cfg.divergence.alpha is None
                              else f"alpha({cfg.divergence.alpha:g})"),
            "samples": policy["samples"].texts[:SHOWN_SAMPLES]}


def _first(draws: dict, n: int) -> dict:
    """The first ``n`` of a ``sample_and_score`` result (plus ``logp_base``), for a row over n draws."""
    if draws["logp"].shape[0] == n:
        return draws
    samples = draws["samples"]
    head = Samples(token_ids=samples.token_ids[:n], mask=samples.mask[:n], texts=samples.texts[:n],
                   context_ids=samples.context_ids[:n], contexts=None if samples.contexts is None else samples.contexts[:n])
    return {**draws, "samples": head, "logp": draws["logp"][:n],
            "logp_base": draws["logp_base"][:n], "log_scores": draws["log_scores"][:n],
            "features": {k: v[:n] for k, v in draws["features"].items()}}


def _rejection_sampled_gain(policy_model, base_model, tokenizer, task: Task, *, n: int, max_new_tokens: int, seed: int,
                            prompts: PromptSet | None) -> dict:
    """{"kl_gain_rs", "kl_gain_rs_se", "kl_gain_rs_draws"}: KL(p‖a) − KL(p‖π) = E_p[log π − log a] over the
    base draws that meet a pointwise constraint (exact draws from p: no Z, no weights), from ``n`` fresh base
    draws. None values when the target is not a pure constraint (some score is neither 0 nor −inf) or no draw
    met it. For a conditional target the mean is over contexts in proportion to their accepted draws."""
    fresh = sample_and_score(base_model, tokenizer, task, n=n, max_new_tokens=max_new_tokens, seed=seed,
                             prompts=prompts)
    scores = fresh["log_scores"].to(torch.float64)
    accepted = torch.isfinite(scores)
    pure = bool((scores[accepted] == 0).all())
    if not pure or not bool(accepted.any()):
        return {"kl_gain_rs": None, "kl_gain_rs_se": None, "kl_gain_rs_draws": int(accepted.sum()) if pure else 0}
    keep = torch.nonzero(accepted).flatten()
    samples = fresh["samples"]
    logp_pi = sequence_logprob(policy_model, fresh["prompt_ids"][keep], fresh["prompt_mask"][keep],
                               samples.token_ids[keep], samples.mask[keep])
    gain = logp_pi - fresh["logp"][keep]
    se = float(gain.std() / math.sqrt(len(gain))) if len(gain) > 1 else None
    return {"kl_gain_rs": float(gain.mean()), "kl_gain_rs_se": se, "kl_gain_rs_draws": len(gain)}


def run(args) -> int:
    """``fdpg-scale eval OUTPUT_DIR [--samples N] [--seed S]`` (arguments parsed by ``fdpg_scale.apps.cli``)."""
    for option, value in (("--samples", args.samples), ("--base-samples", args.base_samples)):
        if value < 1:
            raise ConfigError(f"eval {option} must be ≥ 1, got {value}")
    if args.seed is not None and not 0 <= args.seed < 2 ** 63:
        raise ConfigError(f"eval --seed must be in [0, 2**63), got {args.seed}")
    r = evaluate_run(args.output_dir, n=args.samples, seed=args.seed, n_base=args.base_samples)
    keys = (*[k for k in r["policy"] if k.startswith("alignment") and not k.startswith("alignment_se")],
            "kl_p_pi", "kl_pi_a", "distinct_1", "distinct_2", "self_bleu_3")
    print("| model | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for name in ("base", "policy"):
        print(f"| {name} | " + " | ".join(f"{r[name][k]:.4f}" for k in keys) + " |")
    print(f"KL(p‖π) and KL(p‖a) rest on {r['policy']['kl_p_pi_draws']} of {r['n_base']} base draws with P > 0")
    if r["kl_gain_rs"] is not None:
        print(f"rejection-sampled KL(p‖a) − KL(p‖π) = {r['kl_gain_rs']:.4f} ± {r['kl_gain_rs_se'] or math.nan:.4f} "
              f"(SE; {r['kl_gain_rs_draws']} exact draws from p)")
    print(f"wrote {Path(args.output_dir) / 'eval.json'}")
    return 0
