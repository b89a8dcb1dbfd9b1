"""``cascadelab compare (--sweep NAME | --experiment NAME)``: paper-style tables from MLflow runs.

Prints markdown tables (method x metric, mean ± std over seeds, each method's difference to bce with a
95% interval and, where the runs' dataset.json records it, the oracle's joint recall and the fraction of
it reached; recall vs tau; recall and step time vs sampled negatives; streaming recall per day, whichever
the runs support) and writes them as CSV + PNG to ``--out``; for a sweep the files are also logged to its
MLflow parent run under ``compare/``.
"""

from __future__ import annotations

import argparse

from cascadelab.jobs.common import standalone
from cascadelab.platform.tracking import resolve_tracking_uri
from cascadelab.platform.tune.compare import compare


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="paper-style tables and plots from a sweep's or an experiment's MLflow runs",
                       description="Read finished training runs back from MLflow and print method x metric tables "
                                   "(mean ± std over seeds, the difference to bce with a 95% interval, the oracle "
                                   "of the runs' synthetic dataset), recall vs tau, recall and step time vs "
                                   "sample_num and streaming recall, as the runs allow; write CSV and PNG files.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--sweep", metavar="NAME", help="the child runs of sweep NAME (cascadelab sweep)")
    which.add_argument("--experiment", metavar="NAME", help="every finished training run of MLflow experiment NAME")
    p.add_argument("--tracking-uri", default=None, metavar="URI",
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="directory for the CSV / PNG / markdown files (default: compare_results/NAME)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    uri = resolve_tracking_uri(args.tracking_uri)
    result = compare(uri, sweep=args.sweep, experiment=args.experiment, out=args.out)
    print(f"{result.label}: {result.runs} finished runs")
    for table in result.tables:
        print(f"\n### {table.title}\n\n{table.markdown}")
    where = result.files[0].parent if result.files else args.out
    print(f"\nwrote {len(result.files)} files to {where}"
          + (f"; logged to MLflow run {result.parent_run_id} under compare/" if result.parent_run_id else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(standalone(add_parser, "compare"))
