"""The f-DPG training loop: sample, score, weigh, step, log, save. Read it top to bottom.

One optimizer step on the global batch (``train.global_batch`` sequences, whatever the world size):

1. **sample** this rank's share from the proposal q (or from π on-policy), chunk by chunk (rollout.py);
2. **score** each sample: base log a(x), the target's log-scores, so log P(x) = log a(x) + Σ log-scores;
3. **log Z**: fold every sample's log P(x) − log q(x) into the running estimate (all ranks, all chunks:
   the value used for this step is the same on every rank and for every world size);
4. **weigh**: per micro-batch, log π(x) through the fused head inside the policy engine's forward,
   ``fdiv_weights`` → weight = (π/q)·(f′(π/p) + B); loss = mean(weight · log π); backward; DeepSpeed
   averages over ranks and accumulation steps and steps at the boundary;
5. **update** the baseline (after its use), and every ``proposal_update_interval`` steps replace q by π if
   π is closer to p;
6. **log** metrics.jsonl / TensorBoard / a summary line; **save** a checkpoint every ``save_every`` steps, at
   the end, and when SLURM (or anyone) sends SIGUSR1/SIGTERM.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from fdpg_scale.distributed import checkpoint as ckpt
from fdpg_scale.training.config import RunConfig, config_to_dict
from fdpg_scale.distributed.launch import all_gather_rows, barrier, init_distributed, is_rank0
from fdpg_scale.core.divergences import get_divergence
from fdpg_scale.distributed.engines import build_frozen, build_policy, copy_policy_into_proposal, sequence_logprobs, train_step
from fdpg_scale.core.estimator import fdpg_loss
from fdpg_scale.distributed.generation import SamplingSettings
from fdpg_scale.kernels import fdiv_weights
from fdpg_scale.core.metrics import importance_sampled_metrics
from fdpg_scale.training.preemption import PreemptionSignal
from fdpg_scale.training.prompts import load_prompts
from fdpg_scale.training.rollout import collect_chunks
from fdpg_scale.training.run_setup import deepspeed_config, prepare_model_dir, prepare_output_dir
from fdpg_scale.training.sampler import build_sampler, sync_sampler
from fdpg_scale.training.run_log import RunLogger
from fdpg_scale.training.target_fitting import fit_distributional_task
from fdpg_scale.targets.tasks import build_task
from fdpg_scale.training.timing import PhaseTimer
from fdpg_scale.training.state import TrainerState

__all__ = ["train"]


def train(cfg: RunConfig) -> None:
    """Run (or resume) the f-DPG training described by ``cfg`` on the ranks this process belongs to."""
    launch = init_distributed()
    rank, world = launch.rank, launch.world_size
    accumulation = cfg.train.accumulation_steps(world)
    preemption = PreemptionSignal.install()

    prepare_output_dir(cfg.output_dir)
    model_dir = prepare_model_dir(cfg.model, seed=cfg.seed)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ds_config = deepspeed_config(cfg, world_size=world, accumulation=accumulation)
    policy = build_policy(model_dir, ds_config, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                          warmup_steps=cfg.train.warmup_steps, lr_schedule=cfg.train.lr_schedule,
                          total_steps=cfg.train.steps)
    base = build_frozen(model_dir, ds_config)
    proposal = None if cfg.train.on_policy else build_frozen(model_dir, ds_config)
    task = build_task(cfg.target, tokenizer)
    prompts = None if cfg.target.prompts_file is None else load_prompts(cfg.target.prompts_file, tokenizer)
    divergence = get_divergence(cfg.divergence.name, alpha=cfg.divergence.alpha)
    settings = SamplingSettings(temperature=cfg.sampling.temperature, top_k=cfg.sampling.top_k,
                                top_p=cfg.sampling.top_p, max_new_tokens=cfg.sampling.max_new_tokens)

    state = TrainerState.fresh(cfg, num_contexts=1 if prompts is None else len(prompts))
    fingerprint = {"model": ckpt.model_config_hash(model_dir), "divergence": str(divergence),
                   "target": asdict(cfg.target), "on_policy": cfg.train.on_policy}
    latest = ckpt.find_latest(cfg.output_dir)
    if latest is not None:
        state.load_state_dict(ckpt.load_checkpoint(latest, policy=policy, proposal=proposal,
                                                   fingerprint=fingerprint))
    if task.moment is not None:  # distributional target: λ fitted once, then kept in the trainer state
        if state.lambdas is None:
            task, fit = fit_distributional_task(task, sampler=policy if proposal is None else proposal, base=base,
                                                tokenizer=tokenizer, settings=settings,
                                                mode=cfg.sampling.generation_mode, run_seed=cfg.seed, rank=rank,
                                                world=world, micro_batch=cfg.train.micro_batch,
                                                n_samples=cfg.target.fit_samples)
            state.lambdas = fit.lambdas.tolist()
            fit_note = (f"λ = {state.lambdas} fitted on {cfg.target.fit_samples} samples: E_p[φ] ≈ "
                        f"{fit.moments.tolist()} (target {cfg.target.moment}), ESS {fit.ess:.1f}")
        else:
            task = task.with_lambdas(state.lambdas)
            fit_note = f"λ = {state.lambdas} (from the checkpoint)"
    if is_rank0():  # what `fdpg-scale eval` and a later reader need to know about this run
        (Path(cfg.output_dir) / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    log = RunLogger(cfg.output_dir, enabled=is_rank0(), total_steps=cfg.train.steps, start_step=state.step,
                    summary_every=cfg.logging.summary_every, tensorboard=cfg.logging.tensorboard,
                    progress_bar=cfg.logging.progress_bar)
    log.message(f"f-DPG {divergence} | world {world} ({launch.source}) | global batch {cfg.train.global_batch} = "
                f"{cfg.train.micro_batch} per micro-step × {accumulation} accumulation × {world} ranks | "
                f"≤ {cfg.train.global_batch * cfg.sampling.max_new_tokens} generated tokens per step | "
                + (f"resumed at step {state.step} from {latest}" if latest else "fresh start"))
    if task.moment is not None:
        log.message(fit_note)

    sampler = build_sampler(cfg, model_dir, policy=policy, proposal=proposal)
    for step in range(state.step, cfg.train.steps):
        timer = PhaseTimer()
        sync_sampler(sampler, cfg, policy=policy, proposal=proposal, state=state, timer=timer)
        chunks = collect_chunks(sampler=sampler, base=base, task=task, tokenizer=tokenizer, settings=settings,
                                mode=cfg.sampling.generation_mode, run_seed=cfg.seed, step=step, rank=rank,
                                world=world, accumulation=accumulation, micro_batch=cfg.train.micro_batch,
                                timer=timer, prompts=prompts)
        skipped = state.log_z.update(torch.cat([c.log_target - c.logq for c in chunks]),
                                     torch.cat([c.context_ids for c in chunks])).all()
        if skipped:  # no sample of the global batch has P(x) > 0: nothing to learn from, log Z unchanged
            state.step = step + 1
            log.message(f"step {state.step} skipped: 0/{cfg.train.global_batch} samples have P(x) > 0 (the target's "
                        f"constraint held on none of them); log Z unchanged")
            log.log(state.step, {"loss": 0.0, "log_z": float(state.log_z.value.mean()), "skipped": 1})
        else:
            weighed = [_weigh_and_backward(policy, chunk, state, divergence, cfg.divergence.clip, timer)
                       for chunk in chunks]
            state.step = step + 1
            log.log(state.step, _after_step(cfg, state, policy, proposal, chunks, weighed, timer))

        stop = preemption.requested()
        if stop or state.step == cfg.train.steps or state.step % cfg.train.save_every == 0:
            path = ckpt.save_checkpoint(cfg.output_dir, state.step, policy=policy, proposal=proposal,
                                        trainer_state=state.state_dict(), fingerprint=fingerprint,
                                        keep=cfg.train.keep_checkpoints)
            log.message(f"checkpoint {path}")
        if stop:
            log.message(f"stopping at step {state.step} on a stop signal ({preemption.name or 'another rank'}): "
                        f"rerun with the same output_dir to resume")
            break
    log.close()
    barrier()
    # Tear the group down explicitly: gloo/nccl threads left to interpreter exit can abort the process
    # ("terminate called without an active exception") after a successful run.
    torch.distributed.destroy_process_group()


def _weigh_and_backward(policy, chunk, state: TrainerState, divergence, clip: float | None, timer: PhaseTimer):
    """Step 4 of the module docstring for one micro-batch: log π, weights, loss, backward (and the optimizer
    step at the accumulation boundary). Returns (log π(x) [B] detached, FDivWeights)."""
    r = chunk.rollout
    with timer.phase("logprobs"):
        logp_pi_tok = sequence_logprobs(policy, r.input_ids, r.attention_mask, r.gen_mask)
        log_z = state.log_z.values_for(chunk.context_ids)
    w = fdiv_weights(logp_pi_tok.detach().cpu(), r.logprobs, chunk.logp_base, log_z, divergence,
                         baseline=state.baseline.value, clip=clip, mask=r.gen_mask, log_scores=chunk.log_scores)
    with timer.phase("backward"):
        train_step(policy, fdpg_loss(logp_pi_tok.sum(-1), w.weight))
    return logp_pi_tok.detach().sum(-1).cpu(), w


def _after_step(cfg: RunConfig, state: TrainerState, policy, proposal, chunks, weighed, timer: PhaseTimer) -> dict:
    """Step 5 of the module docstring on the whole global batch (identical on every rank): update the
    baseline, maybe replace q by π; returns the step's metrics."""
    batch = all_gather_rows({
        "logp_pi": torch.cat([lp for lp, _ in weighed]), "logq": torch.cat([c.logq for c in chunks]),
        "logp_base": torch.cat([c.logp_base.sum(-1) for c in chunks]),
        "log_target": torch.cat([c.log_target for c in chunks]),
        "feature": torch.cat([c.feature for c in chunks]),
        "pseudo_reward": torch.cat([w.pseudo_reward for _, w in weighed]),
        "importance_ratio": torch.cat([w.importance_ratio for _, w in weighed]),
        "weight": torch.cat([w.weight for _, w in weighed]),
        "tokens": torch.cat([c.rollout.gen_mask.sum(-1).float() for c in chunks]),
        "context_ids": torch.cat([c.context_ids for c in chunks]),
    })
    conditional = state.log_z.num_contexts > 1
    log_z = state.log_z.values_for(batch["context_ids"])          # [N] log Z(c_i)
    baseline_used = state.baseline.value
    state.baseline.update(batch["pseudo_reward"], batch["importance_ratio"])
    replaced = False
    if proposal is not None and state.proposal_schedule.due(state.step):
        # Decided on this batch's log π from before the optimizer step (no extra forward pass); self-normalised
        # over the batch when unconditional, with each sample's own Z(c) when conditional.
        replaced = state.proposal_schedule.should_replace(logp_pi=batch["logp_pi"], logp_q=batch["logq"],
                                                          log_target=batch["log_target"],
                                                          log_z=log_z if conditional else None)
        if replaced:
            copy_policy_into_proposal(policy, proposal)
            state.proposal_version += 1
    metrics = importance_sampled_metrics(logp_pi=batch["logp_pi"], logp_q=batch["logq"], logp_a=batch["logp_base"],
                                         log_target=batch["log_target"], log_z=log_z,
                                         features={"alignment": batch["feature"]},
                                         context_ids=batch["context_ids"] if conditional else None)
    metrics["alignment"] = metrics.pop("phi_mean/alignment")
    metrics["alignment_se"] = metrics.pop("phi_mean_se/alignment")
    tokens = float(batch["tokens"].sum())
    return {
        "loss": float((batch["weight"] * batch["logp_pi"]).mean()), "log_z": float(state.log_z.value.mean()),
        "baseline": baseline_used, "pseudo_reward_mean": float(batch["pseudo_reward"].mean()),
        "weight_abs_max": float(batch["weight"].abs().max()),
        "q_alignment_rate": float(batch["feature"].mean()),
        **metrics,
        "proposal_version": state.proposal_version, "proposal_replaced": int(replaced),
        "lr": policy.get_lr()[0], "tokens": tokens, "tokens_per_s": tokens / timer.total, "time/step": timer.total,
        **timer.as_metrics(),
    }
