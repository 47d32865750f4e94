"""The method's mathematics: divergences f and f′ in log space, the f-DPG estimator (loss, baseline,
running log Z, proposal schedule) and the one training step, importance-sampled and exact metrics, and the
moment fit of a distributional target's λ.

Imports only ``fdpg_scale.kernels`` (below it); everything above builds on it. See docs/method.md.
"""
