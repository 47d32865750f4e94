"""What the trainer samples q from (``sampling.engine``), and keeping a vLLM copy of q current.

- ``hf``: the ZeRO-3 engine that *is* q (the proposal, or the policy on-policy); nothing to keep in sync.
- ``vllm``: a ``VllmProposal`` per rank holding a copy of q's weights. q changes when the proposal is
  replaced by π (off-policy: rarely, by design) or at every optimizer step (on-policy: q is π). Before each
  step's sampling, the ZeRO-3 backend (training/backend.py) compares the version of q the engine holds
  (``q_version``) with the current one and pushes the weights only when they differ; a fresh or resumed
  run's first step pushes the weights it starts from (a checkpoint's q is not the model directory's).
"""

from __future__ import annotations

from pathlib import Path

from fdpg_scale.distributed.launch import device
from fdpg_scale.distributed.vllm_engine import VllmEngineSettings, VllmProposal
from fdpg_scale.training.config import RunConfig
from fdpg_scale.training.state import TrainerState

__all__ = ["build_vllm_sampler", "q_version"]


def build_vllm_sampler(cfg: RunConfig, model_dir: str | Path) -> VllmProposal | None:
    """A started ``VllmProposal`` for ``sampling.engine: vllm`` (None for ``hf``: q's ZeRO-3 engine samples).

    The vLLM engine starts with the model directory's weights; the backend pushes q's before the first draw.
    On GPUs its worker runs on this rank's GPU (several ranks per node: one engine per GPU).
    """
    if cfg.sampling.engine == "hf":
        return None
    v = cfg.sampling.vllm
    settings = VllmEngineSettings(dtype="bfloat16" if cfg.model.dtype == "bf16" else "float32",
                                  kv_cache_bytes=None if v.kv_cache_mib is None else v.kv_cache_mib * 2**20,
                                  **v.engine_options())
    return VllmProposal(model_dir, settings, seed=cfg.seed, device=device())


def q_version(cfg: RunConfig, state: TrainerState) -> tuple[str, int]:
    """Which q the run samples from now: the policy after ``state.step`` updates (on-policy) or the proposal
    after ``state.proposal_version`` replacements."""
    return ("policy", state.step) if cfg.train.on_policy else ("proposal", state.proposal_version)
