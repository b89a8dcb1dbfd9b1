"""``cascadelab train`` / ``python -m cascadelab.jobs.train``: tracked training runs on Ray.

``--seeds N`` repeats the run with N consecutive seeds under one MLflow parent run that holds the mean
and standard deviation of every final metric (``mean/joint_recall_at_10_20``, ``std/...``; see
:meth:`cascadelab.platform.metric_names.MetricNames.summary_name`); ``--resume RUN`` continues an
interrupted run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from cascadelab.cascade.metrics import metric_names
from cascadelab.jobs.common import add_config_args, standalone
from cascadelab.platform.config import CascadeConfig, ConfigError, flatten, load_config
from cascadelab.platform.metric_names import MetricNames
from cascadelab.platform.tracking import Tracker, resolve_tracking_uri
from cascadelab.platform.train.run import load_run_config, run_training


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a cascade on Ray, tracked in MLflow",
                       description="Train the cascade described by the config (defaults: two-stage "
                                   "DSSM top-30 -> DIN top-20 with DFTopK on data/demo) with Ray Train, day "
                                   "by day, evaluate on the held-out last day, log everything to MLflow.")
    add_config_args(p)
    p.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="repeat with N consecutive seeds (train.seed, +1, ...) and report mean +- std")
    p.add_argument("--resume", metavar="RUN_NAME",
                   help="continue an interrupted run from its last checkpoint, with its logged config")
    p.set_defaults(func=main)


def mean_std(results: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    out = {}
    for key in results[0]:
        values = [r[key] for r in results if key in r]
        if len(values) == len(results):
            out[key] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
    return out


def summary_keys(num_stages: int) -> list[str]:
    """What the repeated-seeds summary prints: every evaluation metric of the cascade, then throughput."""
    return [*metric_names(num_stages), "samples_per_s"]


def main(args: argparse.Namespace) -> int:
    if args.seeds < 1:
        raise ConfigError(f"--seeds: expected a positive number of repeats, got {args.seeds}")
    cfg = load_config(args.config, args.overrides)
    if args.resume:
        if args.seeds != 1:
            raise ConfigError("--resume continues one run; it cannot be combined with --seeds")
        cfg = load_run_config(resolve_tracking_uri(cfg.tracking.uri), cfg.tracking.experiment, args.resume)
        result = run_training(cfg, resume=args.resume)
        print(json.dumps({"run_id": result.run_id, "run_name": result.run_name, "metrics": result.metrics}, indent=2))
        return 0
    if args.seeds == 1:
        result = run_training(cfg)
        print(json.dumps({"run_id": result.run_id, "run_name": result.run_name,
                          "tracking_uri": result.tracking_uri, "metrics": result.metrics}, indent=2))
        return 0
    return repeat_seeds(args, cfg)


def repeat_seeds(args: argparse.Namespace, cfg: CascadeConfig) -> int:
    """``--seeds N``: N runs with consecutive seeds under one parent run holding each metric's mean and std."""
    base = cfg.train.seed
    name = f"{cfg.objective.name}-x{args.seeds}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    parent = Tracker.start(resolve_tracking_uri(cfg.tracking.uri), cfg.tracking.experiment, name,
                           {**flatten(cfg.to_dict()), "seeds": args.seeds},
                           tags={"cascadelab.repeats": str(args.seeds)})
    results = []
    try:
        for i in range(args.seeds):
            run_cfg = load_config(args.config, [*args.overrides, f"train.seed={base + i}"])
            results.append(run_training(run_cfg, tags={"mlflow.parentRunId": parent.run_id}).metrics)
    except BaseException:
        parent.close("FAILED")
        raise
    stats = mean_std(results)
    names = MetricNames.of(cfg)
    parent.log_dict({**{names.summary_name(k, "mean"): m for k, (m, _) in stats.items()},
                     **{names.summary_name(k, "std"): s for k, (_, s) in stats.items()}})
    parent.close()
    print(f"{cfg.objective.name}, {args.seeds} seeds ({base}..{base + args.seeds - 1}), "
          f"MLflow parent run {parent.run_id}:")
    for key in summary_keys(len(cfg.stages)):
        if key in stats:
            print(f"  {key:18s} {stats[key][0]:.4f} +- {stats[key][1]:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(standalone(add_parser, "train"))
