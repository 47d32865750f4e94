"""What the trainer samples q from (``sampling.engine``), and keeping a vLLM copy of q current.

- ``hf``: the ZeRO-3 engine that *is* q (the proposal, or the policy on-policy); nothing to keep in sync.
- ``vllm``: a ``VllmProposal`` per rank holding a copy of q's weights. q changes when the proposal is
  replaced by π (off-policy: rarely, by design) or at every optimizer step (on-policy: q is π). Before each
  step's sampling, ``sync_sampler`` compares the version of q the engine holds with the current one and
  pushes the weights only when they differ; a fresh or resumed run's first step pushes the weights it starts
  from (a checkpoint's q is not the model directory's).
"""

from __future__ import annotations

from pathlib import Path

from fdpg_scale.distributed.vllm_engine import VllmEngineSettings, VllmProposal
from fdpg_scale.training.config import RunConfig
from fdpg_scale.training.state import TrainerState
from fdpg_scale.training.timing import PhaseTimer

__all__ = ["build_sampler", "sync_sampler", "q_version"]


def build_sampler(cfg: RunConfig, model_dir: str | Path, *, policy, proposal):
    """The object ``collect_chunks`` samples from: q's ZeRO-3 engine (hf) or a started ``VllmProposal``.

    The vLLM engine starts with the model directory's weights; ``sync_sampler`` pushes q's before use.
    """
    if cfg.sampling.engine == "hf":
        return policy if proposal is None else proposal
    v = cfg.sampling.vllm
    settings = VllmEngineSettings(dtype="bfloat16" if cfg.model.dtype == "bf16" else "float32",
                                  kv_cache_bytes=None if v.kv_cache_mib is None else v.kv_cache_mib * 2**20,
                                  gpu_memory_utilization=v.gpu_memory_utilization, max_model_len=v.max_model_len,
                                  enforce_eager=v.enforce_eager)
    return VllmProposal(model_dir, settings, seed=cfg.seed)


def q_version(cfg: RunConfig, state: TrainerState) -> tuple[str, int]:
    """Which q the run samples from now: the policy after ``state.step`` updates (on-policy) or the proposal
    after ``state.proposal_version`` replacements."""
    return ("policy", state.step) if cfg.train.on_policy else ("proposal", state.proposal_version)


def sync_sampler(sampler, cfg: RunConfig, *, policy, proposal, state: TrainerState, timer: PhaseTimer) -> bool:
    """Push q's current weights into a vLLM sampler if it holds another version (collective: all ranks call).

    The seconds go to ``timer``'s "refresh" phase. No-op for the hf engine. Returns True when weights moved.
    """
    if not isinstance(sampler, VllmProposal):
        return False
    version = q_version(cfg, state)
    if sampler.version == version:
        return False
    with timer.phase("refresh"):
        sampler.refresh_from(policy if proposal is None else proposal, version=version)
    return True
