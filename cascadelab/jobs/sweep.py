"""``cascadelab sweep CONFIG`` / ``python -m cascadelab.jobs.sweep CONFIG``: a Ray Tune grid of training runs.

Every grid point of the sweep config becomes one Tune trial that launches one Ray Train run, tracked as a
child of the sweep's MLflow parent run. ``--resume`` continues an interrupted sweep without re-running the
trials that finished. See ``cascadelab.platform.tune.sweep`` for the config format. The result table has
joint recall and every stage's recall (from the stage list).
"""

from __future__ import annotations

import argparse

from cascadelab.jobs.common import add_skip_bad_files, add_verbose, standalone
from cascadelab.platform.tune.sweep import load_sweep, preflight, run_sweep


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="run a Ray Tune grid of training runs (one MLflow parent run)",
                       description="Run every point of the grid in the sweep CONFIG (YAML: base, grid, optional "
                                   "asha and max_concurrent_trials) as a Ray Tune trial that trains with Ray Train. "
                                   "Results: MLflow child runs under one parent run; Tune state under "
                                   "train.storage_path/sweeps/NAME. Studies: configs/studies/*.yaml.")
    p.add_argument("config", metavar="CONFIG", help="sweep config YAML, e.g. configs/studies/tau-sensitivity.yaml")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted sweep of this name (finished trials are not run again)")
    p.add_argument("--name", help="sweep name (default: the config's 'name', else the file's stem)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the sweep's base config, e.g. --set data.path=/data/recflow (repeatable)")
    add_skip_bad_files(p)
    add_verbose(p)
    p.set_defaults(func=main)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


def main(args: argparse.Namespace) -> int:
    spec = load_sweep(args.config, args.overrides, args.name)  # every grid point validated: no Ray yet
    preflight(spec)
    result = run_sweep(spec, resume=args.resume)
    keys = list(spec.grid)
    cols = ["trial_id", *keys, "status", *spec.metric_names(ndcg=False)]  # joint, then each stage's recall
    rows = sorted(result.trials, key=lambda r: -(r.get("joint_recall") or -1.0))
    print(f"sweep {result.name}: {len(rows)} trials, MLflow parent run {result.parent_run_id} in {result.tracking_uri}")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    if result.best is not None:
        best = ", ".join(f"{k}={result.best[k]}" for k in keys)
        print(f"best: trial {result.best['trial_id']} ({best}), joint_recall {result.best['joint_recall']:.4f}")
    print(f"tables: cascadelab compare --sweep {result.name} --tracking-uri {result.tracking_uri}")
    if result.errors:
        print(f"{result.errors} trial(s) failed; fix the cause and continue with: "
              f"cascadelab sweep {args.config} --name {result.name} --resume")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(standalone(add_parser, "sweep"))
