"""The ``cascadelab`` subcommands, one module ``cascadelab.jobs.<module>`` each, and their registry.

A job module defines ``add_parser(sub)``, which adds its subcommand(s) to an argparse subparsers action
and sets ``func`` to the function that runs it, and runs standalone as ``python -m cascadelab.jobs.<module>``.

:data:`COMMANDS` is the one list of subcommands. The CLI lists them from it without importing the job
modules and imports only the module of the command it runs (a job module imports the platform, hence
torch and pyarrow), the registry shape of pip's ``pip._internal.commands.commands_dict``. The cluster
layer is handed the names of :func:`submittable` commands and their parsers by ``jobs.submit``.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass

AddParser = Callable[[argparse._SubParsersAction], None]


@dataclass(frozen=True)
class Command:
    module: str  # cascadelab.jobs.<module> defines the subcommand in its add_parser
    summary: str  # the line `cascadelab --help` shows
    submittable: bool = True  # `cascadelab submit -- <name>` runs it on a Ray cluster


COMMANDS: dict[str, Command] = {
    "generate": Command("generate", "write synthetic RecFlow-shaped Parquet data"),
    "convert": Command("convert", "convert a public dataset into the project's Parquet schema"),
    "train": Command("train", "train a cascade on Ray, tracked in MLflow"),
    "sweep": Command("sweep", "run a Ray Tune grid of training runs (one MLflow parent run)"),
    "score": Command("score", "score requests with a training run's MLflow model (top-k per stage)"),
    "compare": Command("compare", "paper-style tables and plots from a sweep's or an experiment's MLflow runs"),
    "report": Command("report", "one self-contained HTML page of sweeps' tables, figures and MLflow runs"),
    "demo": Command("demo", "end-to-end demo: generate data, train bce and dftopk, print a table"),
    "bench": Command("bench", "run a benchmark suite (JSON + PNG + MLflow run)"),
    "submit": Command("submit", "run a cascadelab job on a Ray cluster (Ray Jobs API)", submittable=False),
    "jobs": Command("submit", "list, inspect, follow or stop jobs on a Ray cluster", submittable=False),
}


def submittable() -> list[str]:
    """The commands a cluster can run (``python -m cascadelab.jobs.<name>``), sorted."""
    return sorted(name for name, command in COMMANDS.items() if command.submittable)


def add_parser_of(name: str) -> AddParser:
    """The ``add_parser`` of command ``name``'s module (importing that module only)."""
    return importlib.import_module(f"{__name__}.{COMMANDS[name].module}").add_parser
