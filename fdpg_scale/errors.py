"""Errors that mean "the user's input is wrong" or "the run cannot go on", which the CLI reports in one line.

Imports nothing: every layer may raise them, and the CLI catches them without loading torch (so a command's
own module is imported only when the command runs). Each carries ``every_rank``: True when every rank of a
multi-rank run raises the same error (a config value, a check done collectively), so the CLI prints it once
(rank 0) instead of once per rank; False when only some ranks may see it (e.g. one rank's own checkpoint file,
one rank's samples), so each rank that raises it prints it with its rank.
"""

__all__ = ["ConfigError", "CheckpointError", "CheckpointMismatchError", "ConstraintNeverSatisfied", "ScorerError",
           "NonFiniteScoreError", "NonFiniteError", "RankLostError", "CheckpointWriteError", "EXIT_BAD_INPUT", "EXIT_NONFINITE",
           "EXIT_RANK_LOST"]

EXIT_BAD_INPUT = 2
"""Exit status of a run refused or stopped by one of these errors (a crash exits 1)."""
EXIT_NONFINITE = 3
"""Exit status of a run stopped by the non-finite guard (``train.on_nonfinite``)."""
EXIT_RANK_LOST = 4
"""Exit status of a rank whose collective failed: another rank hung past ``distributed.timeout_s`` or died."""


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or inconsistent; the message names the key."""

    every_rank = True


class CheckpointError(ValueError):
    """A checkpoint cannot be used (damaged, unsafe, or none intact); the message names the file."""

    def __init__(self, message: str, *, every_rank: bool = False):
        super().__init__(message)
        self.every_rank = every_rank


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (a full disk, a quota); every rank agreed on it, and the previous
    checkpoint is untouched."""

    def __init__(self, message: str):
        super().__init__(message, every_rank=True)


class CheckpointMismatchError(CheckpointError):
    """The checkpoint was made by a different model / divergence / target / setup than this run (the same on
    every rank)."""

    def __init__(self, message: str):
        super().__init__(message, every_rank=True)


class ConstraintNeverSatisfied(ValueError):
    """No base sample has a positive target score: Z cannot be estimated (the task is unreachable as posed)."""

    every_rank = True


class ScorerError(ValueError):
    """A scorer of the target returned something that is not one finite number per sample (wrong shape, wrong
    type, NaN or inf) while a run scored its samples; the message names the scorer, the sample and the problem."""

    every_rank = False


class NonFiniteScoreError(ScorerError):
    """A scorer gave NaN or ±inf for a sample: a property of that sample's score, not a bad call. During training
    the non-finite guard (``train.on_nonfinite``) skips the step or stops the run on it, on all ranks together."""


class NonFiniteError(RuntimeError):
    """A step's loss, gradients or weights are not finite and the run stops (decided on all ranks together)."""

    every_rank = True


class RankLostError(RuntimeError):
    """A collective failed on this rank: another rank stopped answering within ``distributed.timeout_s`` or died.
    The message names the step and phase; only the ranks that were waiting see it."""

    every_rank = False
