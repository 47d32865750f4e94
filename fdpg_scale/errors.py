"""Errors that mean "the user's input is wrong" and that the CLI reports in one line (no traceback).

Imports nothing: every layer may raise them, and the CLI catches them without loading torch.
"""

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or inconsistent; the message names the key."""
