"""The ``cascadelab`` command: the subcommands of :data:`cascadelab.jobs.COMMANDS`.

Only the module of the command being run is imported; the others appear in ``--help`` by their
registry summary.
"""

from __future__ import annotations

import argparse
import sys

from cascadelab import __version__
from cascadelab.jobs import COMMANDS, add_parser_of
from cascadelab.jobs.common import run_main, setup_logging


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named in ``argv``: its first word that is not an option."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for ``argv``: the full definition of the command it names, a summary of the others."""
    parser = argparse.ArgumentParser(
        prog="cascadelab",
        description="Train multi-stage recommendation cascades through differentiable top-K operators "
                    "on Ray, tracked in MLflow.")
    parser.add_argument("--version", action="version", version=f"cascadelab {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", 
                        help="debug logging and Ray's internal logging (workers' output, execution plans)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = COMMANDS.get(_command_of(sys.argv[1:] if argv is None else argv) or "")
    for name, command in COMMANDS.items():
        if chosen is None or command.module != chosen.module:
            sub.add_parser(name, help=command.summary)
        elif name == next(n for n, c in COMMANDS.items() if c.module == chosen.module):
            add_parser_of(name)(sub)  # the module adds every command it defines
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    setup_logging(args.verbose)
    return run_main(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
