"""The f-DPG training run: set up, then one ``fdpg_step`` per optimizer step, log, save. Read it top to bottom.

Each optimizer step on the global batch (``train.global_batch`` sequences, whatever the world size) is
``fdpg_scale.core.step.fdpg_step`` on the ZeRO-3 backend (``training/backend.py``): sample from q (or π
on-policy) and score, fold every sample into the running log Z, weigh and backpropagate per micro-batch
(DeepSpeed steps at the accumulation boundary), update the baseline after its use, and replace q by π when the
evidence accumulated since the last check says π is closer to p. This module only builds the engines and the
state, logs ``metrics.jsonl`` / the trackers / a summary line (and every ``logging.samples_every`` steps a table
of sampled completions), and saves a checkpoint every ``save_every`` steps, at the end, and when SLURM (or
anyone) sends SIGUSR1/SIGTERM.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from fdpg_scale.distributed import checkpoint as ckpt
from fdpg_scale.training.config import RunConfig, TargetConfig, config_to_dict
from fdpg_scale.training.config_loader import field_defaults
from fdpg_scale.distributed.launch import barrier, device, init_distributed, is_rank0
from fdpg_scale.core.divergences import get_divergence
from fdpg_scale.core.metrics import importance_sampled_metrics
from fdpg_scale.core.step import StepResult, StepSettings, fdpg_step, no_estimate
from fdpg_scale.distributed.adapters import adapter_views
from fdpg_scale.distributed.engines import build_frozen, build_policy
from fdpg_scale.distributed.inference_copy import InferenceCopy
from fdpg_scale.training.nonfinite import NonFiniteGuard
from fdpg_scale.training.preemption import PreemptionSignal
from fdpg_scale.training.progress import RunProgress, collective_failures
from fdpg_scale.training.in_run_eval import evaluate_policy, is_due
from fdpg_scale.training.preflight import preflight
from fdpg_scale.training.prompts import load_target_prompts
from fdpg_scale.training.backend import ZeroBackend
from fdpg_scale.training.rollout import RolloutPlan, describe_logq_source, logq_mismatch_metrics
from fdpg_scale.training.run_setup import deepspeed_config, prepare_output_dir
from fdpg_scale.training.sampler import build_vllm_sampler, longest_prompt, q_version
from fdpg_scale.training.run_log import RunLogger
from fdpg_scale.training.samples_table import sample_rows
from fdpg_scale.training.trackers import build_trackers
from fdpg_scale.training.alignment import alignment_columns
from fdpg_scale.training.target_fitting import describe_fit, fit_distributional_task
from fdpg_scale.targets.tasks import build_task
from fdpg_scale.training.state import TrainerState

__all__ = ["train"]


def train(cfg: RunConfig) -> None:
    """Run (or resume) the f-DPG training described by ``cfg`` on the ranks this process belongs to.

    A collective that fails (another rank hung past ``distributed.timeout_s``, or died) raises RankLostError,
    naming the step and phase (``training/progress.py``)."""
    progress = RunProgress()
    with collective_failures(progress, timeout_s=cfg.distributed.timeout_s):
        _train(cfg, progress)


def _train(cfg: RunConfig, progress: RunProgress) -> None:
    launch = init_distributed(timeout_s=cfg.distributed.timeout_s)
    rank, world = launch.rank, launch.world_size
    accumulation = cfg.train.accumulation_steps(world)
    preemption = PreemptionSignal.install()

    prepare_output_dir(cfg.output_dir)
    model_dir = preflight(cfg, world_size=world)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = load_target_prompts(cfg.target, tokenizer)
    task = build_task(cfg.target, tokenizer, device=device(), dtype=cfg.model.dtype,  # before the engines: a bad
                      metadata_columns=() if prompts is None else tuple(prompts.metadata))  # scorer fails fast
    ds_config = deepspeed_config(cfg, world_size=world, accumulation=accumulation)
    policy = build_policy(model_dir, ds_config, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                          warmup_steps=cfg.train.warmup_steps, lr_schedule=cfg.train.lr_schedule,
                          total_steps=cfg.train.steps, gradient_checkpointing=cfg.train.gradient_checkpointing,
                          lora=cfg.model.lora, lora_seed=cfg.seed)
    if cfg.model.lora is None:
        base = build_frozen(model_dir, ds_config)
        proposal = None if cfg.train.on_policy else build_frozen(model_dir, ds_config)
    else:  # one base: a = adapters off, q = the frozen proposal adapter (distributed/adapters.py)
        base, proposal = adapter_views(policy, on_policy=cfg.train.on_policy)
    divergence = get_divergence(cfg.divergence.name, alpha=cfg.divergence.alpha)
    plan = RolloutPlan.from_config(cfg, rank=rank, world=world)

    state = TrainerState.fresh(cfg, num_contexts=1 if prompts is None else len(prompts))
    fingerprint = {"model": ckpt.model_config_hash(model_dir), "divergence": str(divergence),
                   "target": asdict(cfg.target), "on_policy": cfg.train.on_policy,
                   **({} if cfg.model.lora is None else {"lora": asdict(cfg.model.lora)})}
    progress.at("resume")
    latest = progress.last_checkpoint = ckpt.find_intact(cfg.output_dir)
    if latest is not None:
        # Target settings added in a later release resume at their defaults (field_defaults).
        state.load_state_dict(ckpt.load_checkpoint(latest, policy=policy, proposal=proposal, fingerprint=fingerprint,
                                                   fingerprint_defaults={"target": field_defaults(TargetConfig)}))
    if task.moment is not None:  # distributional target: λ fitted once, then kept in the trainer state
        if state.lambdas is None:
            task, fit = fit_distributional_task(task, sampler=policy if proposal is None else proposal, base=base,
                                                tokenizer=tokenizer, plan=plan, n_samples=cfg.target.fit_samples)
            state.lambdas = fit.lambdas.tolist()
            fit_note = describe_fit(task, fit, cfg.target.fit_samples)
        else:
            task = task.with_lambdas(state.lambdas)
            fit_note = f"λ = {state.lambdas} (from the checkpoint)"
    if is_rank0():  # what `fdpg-scale eval` and a later reader need to know about this run
        (Path(cfg.output_dir) / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    trackers = [] if not is_rank0() else build_trackers(
        cfg.logging.active_trackers, output_dir=cfg.output_dir, start_step=state.step, config=config_to_dict(cfg),
        project=cfg.logging.project, run_name=cfg.logging.run_name, wandb_mode=cfg.logging.wandb_mode,
        mlflow_tracking_uri=cfg.logging.mlflow_tracking_uri)
    log = RunLogger(cfg.output_dir, enabled=is_rank0(), total_steps=cfg.train.steps, start_step=state.step,
                    summary_every=cfg.logging.summary_every, trackers=trackers, progress_bar=cfg.logging.progress_bar)
    log.message(f"f-DPG {divergence} | world {world} ({launch.source}) | global batch {cfg.train.global_batch} = "
                f"{cfg.train.micro_batch} per micro-step × {accumulation} accumulation × {world} ranks | "
                f"≤ {cfg.train.global_batch * cfg.sampling.max_new_tokens} generated tokens per step | "
                + (f"resumed at step {state.step} from {latest}" if latest else "fresh start"))
    if task.moment is not None:
        log.message(fit_note)
    if cfg.divergence.outside_support_reward is not None and cfg.divergence.unbounded_outside_support():
        log.message(f"samples with P(x) = 0 get the chosen pseudo-reward r = {cfg.divergence.outside_support_reward} "
                    f"(divergence.outside_support_reward: {divergence}'s f′ is +∞ there); their share is logged "
                    f"as outside_support_fraction")
    log.message(describe_logq_source(plan.settings, plan.rescore_logq, plan.recorded_logq_exact))
    if cfg.train.baseline and divergence.exact_baseline is not None:
        log.message(f"baseline: B = {divergence.exact_baseline:g}, {divergence}'s exact E_π[r] (no moving average)")
    guard = NonFiniteGuard(cfg.train, log.message, policy)

    # train.inference_copies: a and q sampled and scored through whole copies (after a resume has loaded q).
    base_scorer = InferenceCopy(base) if cfg.train.inference_copies else base
    q_copy = InferenceCopy(proposal) if cfg.train.inference_copies and proposal is not None else None
    backend = ZeroBackend(policy=policy, proposal=proposal, base=base_scorer, task=task, tokenizer=tokenizer,
                          plan=plan, prompts=prompts,
                          vllm=build_vllm_sampler(cfg, model_dir, prompt_tokens=longest_prompt(prompts)),
                          q_version=lambda: q_version(cfg, state), q_copy=q_copy)
    step_settings = StepSettings(divergence=divergence, clip=cfg.divergence.clip,
                                 outside_support_reward=cfg.divergence.outside_support_reward)
    for step in range(state.step, cfg.train.steps):
        started = time.perf_counter()   # step_wall_s: the whole step, phases and everything between them
        progress.at("optimizer step", step + 1, detail=lambda: backend.timer.current)
        result = fdpg_step(backend, state, step_settings, step, guard)
        state.step = step + 1
        evaluation = {}       # eval.every: fresh samples from π, logged as eval/* in the step's row
        if is_due(state.step, every=cfg.eval.every, total=cfg.train.steps):
            progress.at("in-run evaluation")
            evaluation = evaluate_policy(policy=policy, base=base_scorer, task=task, tokenizer=tokenizer, prompts=prompts,
                                         plan=plan, step=state.step, samples=cfg.eval.samples)
        if result.skipped:   # non-finite values (train.on_nonfinite: skip): nothing of this step reached the state
            log.log(state.step, {"loss": None, "log_z": no_estimate(float(state.log_z.value.mean())), "skipped": 1,
                                 **guard.metrics(), **evaluation, "step_wall_s": time.perf_counter() - started})
        else:
            log.log(state.step, {**_step_metrics(state, result, backend, lr=policy.get_lr()[0]), **guard.metrics(),
                                 **evaluation, "step_wall_s": time.perf_counter() - started})
            if cfg.logging.samples_every and state.step % cfg.logging.samples_every == 0:   # the samples table
                log.log_samples(state.step, sample_rows(state.step, backend.last_samples, result.batch))

        progress.at("stop-signal check")
        stop = preemption.requested()
        if stop or state.step == cfg.train.steps or state.step % cfg.train.save_every == 0:
            progress.at("checkpoint save")
            path = ckpt.save_checkpoint(cfg.output_dir, state.step, policy=policy, proposal=proposal,
                                        trainer_state=state.state_dict(), fingerprint=fingerprint,
                                        keep=cfg.train.keep_checkpoints)
            progress.last_checkpoint = path
            log.message(f"checkpoint {path}")
        if stop:
            log.message(f"stopping at step {state.step} on a stop signal ({preemption.name or 'another rank'}): "
                        f"rerun with the same output_dir to resume")
            break
    log.close()
    progress.at("shutdown")
    barrier()
    # Tear the group down explicitly: gloo/nccl threads left to interpreter exit can abort the process
    # ("terminate called without an active exception") after a successful run.
    torch.distributed.destroy_process_group()


def _step_metrics(state: TrainerState, result: StepResult, backend: ZeroBackend, *, lr: float) -> dict:
    """One ``metrics.jsonl`` record from the step's global batch (identical on every rank)."""
    batch = result.batch
    conditional = state.log_z.num_contexts > 1
    metrics = importance_sampled_metrics(logp_pi=batch.logp_pi, logp_q=batch.logq, logp_a=batch.log_base,
                                         log_target=batch.log_target, log_z=batch.log_z.double(),
                                         features=batch.features,
                                         context_ids=batch.context_ids if conditional else None)
    metrics = alignment_columns(metrics, batch.features)  # one column per scorer (docs: "Your own target")
    schedule = state.proposal_schedule
    tokens = float(batch.extras["tokens"].sum())
    timer = backend.timer
    return {
        "loss": result.loss, "log_z": no_estimate(float(state.log_z.value.mean())),
        "baseline": result.baseline_used, "pseudo_reward_mean": float(batch.pseudo_reward.mean()),
        "weight_abs_max": float(batch.weight.abs().max()),
        "outside_support_fraction": float(torch.isneginf(batch.log_target).double().mean()),
        **metrics, **logq_mismatch_metrics(batch.extras["logq_mismatch"]),
        "proposal_version": state.proposal_version, "proposal_replaced": int(result.replaced),
        "proposal_evidence": 0 if schedule is None else schedule.pending,
        "lr": lr, "tokens": tokens, "tokens_per_s": tokens / timer.total, "time/step": timer.total,
        **timer.as_metrics(),
    }

