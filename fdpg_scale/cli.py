"""``python -m fdpg_scale.cli`` and the ``fdpg-scale`` console script: the command line lives in
``fdpg_scale.apps.cli``; this module keeps the public entry point's path."""

import sys

from fdpg_scale.apps.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
