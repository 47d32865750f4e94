"""Base models the project builds itself, offline: byte-level BPE tokenizers, the tiny test models, the
Python-standard-library corpus, and the stamped on-disk cache they share.

Imports ``fdpg_scale.core`` and below only (nothing distributed, nothing from training).
"""
