"""Targets P(x): decoded samples, scorers (constraints, rewards, features) and energy targets (λ is fitted by
``fdpg_scale.core.moment_fitting``).

Imports ``fdpg_scale.core`` and ``fdpg_scale.kernels`` only.
"""
