"""Targets P(x): decoded samples, scorers (constraints, rewards, features), energy targets and λ fitting.

Imports ``fdpg_scale.core`` and ``fdpg_scale.kernels`` only.
"""
