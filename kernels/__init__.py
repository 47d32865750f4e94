"""Fused kernels (installed as ``fdpg_scale.kernels``)."""
