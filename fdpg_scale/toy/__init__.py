"""The enumerable toy: a tabular LM whose every sequence can be listed, so every quantity has an exact value,
and the toy backend of the f-DPG step (the same step the ZeRO-3 trainer runs).

Imports ``fdpg_scale.core`` and ``fdpg_scale.kernels`` only.
"""
