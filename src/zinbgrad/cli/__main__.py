"""``python -m zinbgrad.cli`` (e.g. under ``torchrun``): the ``zinbgrad`` command."""

import sys

from .parser import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
