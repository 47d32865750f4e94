"""Public path of the divergences: ``from fdpg_scale.divergences import get_divergence``.

They live in ``fdpg_scale.core.divergences``; this module re-exports them.
"""

from fdpg_scale.core.divergences import *  # noqa: F401,F403
from fdpg_scale.core.divergences import __all__  # noqa: F401
