"""``cascadelab bench <suite>``: benchmarks that write JSON + a PNG plot and log an MLflow run.

Suites: ``operators`` (soft top-K / sort operators, the DFTopK paper's runtime protocol extended to
batch 1024 and N = 10,000), ``objectives`` (one training step per cascade objective as N grows) and
``train`` (Ray Data + Ray Train throughput against a bare in-memory loop; 2-worker scaling) and
``ingest`` (rows/s the Ray Data pipeline delivers per Train worker, against a plain PyArrow read and
against the training step's own rate; peak RSS) and ``convert`` (the RecFlow converter's peak RSS and
speed on a release-layout day, extrapolated to a full day).
Ratios inside one JSON are measured side by side in the same process, so they survive a noisy machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cascadelab.jobs.common import standalone
from cascadelab.platform.bench.convert import ConvertBenchConfig, run_convert_bench
from cascadelab.platform.bench.ingest import IngestBenchConfig, run_ingest_bench
from cascadelab.platform.bench.objectives import ObjectiveBenchConfig, run_objective_bench
from cascadelab.platform.bench.operators import OperatorBenchConfig, run_operator_bench
from cascadelab.platform.bench.train import TrainBenchConfig, run_train_bench
from cascadelab.platform.config import ConfigError, flatten, parse_overrides
from cascadelab.platform.tracking import end_run, log_artifacts, log_metrics, resolve_tracking_uri, start_run

log = logging.getLogger(__name__)

#: suite name -> (its config dataclass, the function that runs it and returns the result dict)
SUITES: dict[str, tuple[type, Callable[..., dict]]] = {
    "operators": (OperatorBenchConfig, run_operator_bench),
    "objectives": (ObjectiveBenchConfig, run_objective_bench),
    "train": (TrainBenchConfig, run_train_bench),
    "ingest": (IngestBenchConfig, run_ingest_bench),
    "convert": (ConvertBenchConfig, run_convert_bench),
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark suite (JSON + PNG + MLflow run)",
                       description="Run a benchmark suite. Results go to OUT/<suite>.json and "
                                   "OUT/<suite>.png and to an MLflow run in experiment 'cascadelab-bench'.")
    p.add_argument("suite", choices=list(SUITES))
    p.add_argument("--out", default="bench_results", help="output directory (default: bench_results)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the suite's config dataclass, e.g. --set steps=20")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///<cwd>/mlflow.db)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log an MLflow run")
    p.set_defaults(func=main)


def apply_overrides(cfg: Any, overrides: list[str] | dict[str, Any]) -> Any:
    """Overrides on a flat benchmark config dataclass: ``--set key=value`` strings (values parsed as YAML
    by :func:`cascadelab.platform.config.parse_overrides`) or a dict; a list becomes a tuple where the
    field holds a tuple."""
    changes = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides)
    names = {f.name for f in dataclasses.fields(cfg)}
    for key, value in changes.items():
        if key not in names:
            raise ConfigError(f"unknown benchmark option '{key}'; valid: {', '.join(sorted(names))}")
        if isinstance(value, list) and isinstance(getattr(cfg, key), tuple):
            changes[key] = tuple(value)
    return dataclasses.replace(cfg, **changes)


def scalar_metrics(result: dict[str, Any]) -> dict[str, float]:
    """Numeric leaves of a nested result dict as MLflow metric names (``a/b/c``, odd characters -> ``_``)."""
    return {"".join(c if c.isalnum() or c in "_-./ " else "_" for c in name): float(value)
            for name, value in flatten(result, sep="/").items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def main(args: argparse.Namespace) -> int:
    config_cls, run = SUITES[args.suite]
    cfg = apply_overrides(config_cls(), args.overrides)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = run(cfg, out)
    wall = time.perf_counter() - t0
    summary = result.get("ratios", result.get("summary", {}))
    print(json.dumps(summary, indent=2, default=str))
    print(f"{args.suite}: {out / (args.suite + '.json')} and {out / (args.suite + '.png')} in {wall:.0f} s")
    if not args.no_mlflow:
        uri = resolve_tracking_uri(args.tracking_uri)
        params = {**flatten(dataclasses.asdict(cfg)), "suite": args.suite, "host": platform.node()}
        run_id = start_run(uri, "cascadelab-bench", f"bench-{args.suite}-{time.strftime('%Y%m%d-%H%M%S')}",
                           params, tags={"cascadelab.bench": args.suite})
        metrics = scalar_metrics(summary)
        metrics["wall_time_s"] = wall
        log_metrics(uri, run_id, metrics)
        for name in (f"{args.suite}.json", f"{args.suite}.png"):
            if (out / name).exists():
                log_artifacts(uri, run_id, out / name)
        end_run(uri, run_id)
        print(f"MLflow run {run_id} in {uri}")
    return 0


if __name__ == "__main__":
    raise SystemExit(standalone(add_parser, "bench"))
