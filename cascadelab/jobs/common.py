"""Shared bits of the job entry points: logging setup (quiet Ray unless ``--verbose``) and turning errors
into one-line messages (a user error exits 2, any other failure 1; ``--verbose`` shows its traceback)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from cascadelab.platform.config import ConfigError
from cascadelab.platform.data.schema import DataError
from cascadelab.platform.runtime import is_verbose, one_line_error, set_verbose

USER_ERRORS = (ConfigError, DataError, FileNotFoundError)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("alembic", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    set_verbose(verbose)  # Ray's and MLflow's loggers, the workers' output


def add_verbose(p: argparse.ArgumentParser) -> None:
    """``--verbose`` after the subcommand, as ``cascadelab --verbose <command>`` (SUPPRESS: an absent flag
    leaves the top-level one as given)."""
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="show Ray's internal logging (workers' output, execution plans) and debug logs")


def run_main(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a job; a user error (bad config, bad data) prints one line to stderr and exits 2, any other
    failure prints one line and exits 1 (with ``--verbose`` it propagates, traceback and all)."""
    try:
        return func(args)
    except USER_ERRORS as exc:
        print(f"cascadelab: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the one line; the traceback is what --verbose is for
        if is_verbose():
            raise
        print(f"cascadelab: error: {one_line_error(exc)} (--verbose shows the traceback)", file=sys.stderr)
        return 1


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML file with config overrides")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set objective.tau=100 (repeatable)")
    add_skip_bad_files(p)
    add_verbose(p)


def add_skip_bad_files(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skip-bad-files", dest="overrides", action="append_const", const="data.skip_bad_files=true",
                   help="check every data file first and skip bad ones (corrupt, wrong schema, ids outside "
                        "the vocabulary, NaN labels) instead of stopping; they are logged, counted and the "
                        "count is logged to MLflow (data_skipped_files)")


def standalone(add_parser: Callable[[argparse._SubParsersAction], None], name: str) -> int:
    """``python -m cascadelab.jobs.<name> ...``: the same arguments as ``cascadelab <name> ...``."""
    parser = argparse.ArgumentParser(prog=f"python -m cascadelab.jobs.{name}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args([name, *sys.argv[1:]])
    setup_logging(getattr(args, "verbose", False))
    return run_main(args.func, args)
