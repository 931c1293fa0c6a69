"""The ``gsra-salad`` command line (also ``python -m gsra_salad``).

Subcommands:

- ``train DATASET``: train (or ``--eval-only``) on CVUSA, CVACT or University-1652 with the
  dataset's recipe (:mod:`gsra_salad.recipes`), or on its synthetic ``--demo``;
- ``index``: embed geo-tagged tiles with a trained model into a gallery index;
- ``locate``: answer "where was this photo taken?" against an index
  (:mod:`gsra_salad.localization`).

Problems with the command line or the files end with one line on standard error and exit
status 2; set ``GSRA_SALAD_DEBUG=1`` for the traceback. Library code never prints; the
command line prints its results (JSON lines) and its progress.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ._train import train_main

__all__ = ["main", "train_main"]


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, with one sub-parser per command."""
    from . import _train

    parser = argparse.ArgumentParser(
        prog=prog or "gsra-salad",
        description="Cross-view image geo-localization with GSRA and SALAD.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _train.add_parser(commands)
    _add_localization(commands)
    return parser


def _add_localization(commands) -> None:
    """``index`` and ``locate`` (:mod:`gsra_salad.localization.cli`)."""
    from ..localization import cli as localization

    index = commands.add_parser(
        "index",
        help="embed geo-tagged tiles into a gallery index",
        description=localization.add_index_arguments.__doc__.split("\n\n")[1],
    )
    localization.add_index_arguments(index)
    index.set_defaults(run=lambda args, parser: localization.run_index(args), parser=index)
    locate = commands.add_parser(
        "locate",
        help="where was this photo taken? (top tiles, position, confidence)",
        description=localization.add_locate_arguments.__doc__.split("\n\n")[1],
    )
    localization.add_locate_arguments(locate)
    locate.set_defaults(run=lambda args, parser: localization.run_locate(args), parser=locate)


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """Runs one command; returns the exit status.

    Example:
        >>> main(["train", "cvusa", "--data-root", "/no/such/dir"])  # one line on stderr
        2
    """
    parser = build_parser(prog)
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    return args.run(args, args.parser)
