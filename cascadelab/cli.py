"""The ``cascadelab`` command: one subcommand per job module in ``cascadelab.jobs``."""

from __future__ import annotations

import argparse
import importlib
import sys

from cascadelab import __version__
from cascadelab.jobs.common import run_main, setup_logging

JOB_MODULES = ("generate", "convert", "train", "sweep", "compare", "demo", "bench", "submit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cascadelab",
        description="Train multi-stage recommendation cascades through differentiable top-K operators "
                    "on Ray, tracked in MLflow.")
    parser.add_argument("--version", action="version", version=f"cascadelab {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in JOB_MODULES:
        importlib.import_module(f"cascadelab.jobs.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return run_main(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
