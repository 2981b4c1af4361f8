"""``python -m lstmkit``: the command line (see :mod:`lstmkit.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
