"""Errors that mean "the user's input is wrong" and that the CLI reports in one line (no traceback).

Imports nothing: every layer may raise them, and the CLI catches them without loading torch (so a command's
own module is imported only when the command runs).
"""

__all__ = ["ConfigError", "CheckpointMismatchError", "ConstraintNeverSatisfied", "ScorerError"]


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or inconsistent; the message names the key."""


class CheckpointMismatchError(ValueError):
    """The checkpoint was made by a different model / divergence / world size than this run."""


class ConstraintNeverSatisfied(ValueError):
    """No base sample has a positive target score: Z cannot be estimated (the task is unreachable as posed)."""


class ScorerError(ValueError):
    """A scorer of the target returned something that is not one finite number per sample (wrong shape, wrong
    type, NaN or inf) while a run scored its samples; the message names the scorer, the sample and the problem."""
