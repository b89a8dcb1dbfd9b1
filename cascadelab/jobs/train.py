"""``cascadelab train`` / ``python -m cascadelab.jobs.train``: one tracked training run on Ray."""

from __future__ import annotations

import argparse
import json

from cascadelab.jobs.common import add_config_args, standalone
from cascadelab.platform.config import load_config


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a cascade on Ray, tracked in MLflow",
                       description="Train the cascade described by the config (defaults: two-stage "
                                   "DSSM top-30 -> DIN top-20 with DFTopK on data/demo) with Ray Train, day "
                                   "by day, evaluate on the held-out last day, log everything to MLflow.")
    add_config_args(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from cascadelab.platform.train.run import run_training

    cfg = load_config(args.config, args.overrides)
    result = run_training(cfg)
    print(json.dumps({"run_id": result.run_id, "run_name": result.run_name,
                      "tracking_uri": result.tracking_uri, "metrics": result.metrics}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(standalone(add_parser, "train"))
