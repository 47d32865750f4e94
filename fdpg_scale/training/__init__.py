"""A training run: typed config, run set-up, rollouts, trainer state, the loop that drives the f-DPG step,
logging and preemption.

Imports every layer below it; nothing but ``fdpg_scale.apps`` and ``fdpg_scale.experiments`` imports it.
"""
