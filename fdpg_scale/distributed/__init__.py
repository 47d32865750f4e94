"""The seam to torch.distributed and DeepSpeed ZeRO-3: launch environment, engines with the fused head,
generation, checkpoints and export.

Imports ``fdpg_scale.core``, ``fdpg_scale.targets``, ``fdpg_scale.models`` and ``fdpg_scale.kernels``.
"""
