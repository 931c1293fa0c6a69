"""``python -m gsra_salad``: the command line (see :mod:`gsra_salad.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m gsra_salad"))
