"""``cascadelab report --sweep NAME [--sweep NAME ...] --out FILE.html``: one self-contained HTML page.

The page holds what ``cascadelab compare --sweep NAME`` prints for each sweep (the method table with the
difference to bce and the oracle, recall against tau, against negative samples, streaming recall per
day, whichever the runs support), the training throughput per method and every trial with its MLflow
run; it says which sections it left out and why. It is logged to each sweep's MLflow parent run under
``report/``. See ``cascadelab.platform.tune.report``.
"""

from __future__ import annotations

import argparse

from cascadelab.jobs.common import add_verbose, standalone
from cascadelab.platform.tracking import resolve_tracking_uri
from cascadelab.platform.tune.report import ARTIFACT_DIR, report


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="one self-contained HTML page of sweeps' tables, figures and MLflow runs",
                       description="Read one or more sweeps back from MLflow and write one HTML page that opens "
                                   "without a server: the method table (mean ± std over seeds, difference to bce "
                                   "with a 95% interval, oracle), recall against tau and against negative "
                                   "samples, streaming recall per day, training samples/s per method and every "
                                   "trial with its MLflow run. The page is logged to each sweep's parent run.")
    p.add_argument("--sweep", metavar="NAME", action="append", required=True,
                   help="a sweep (cascadelab sweep) to report; repeat for several sweeps on one page")
    p.add_argument("--out", required=True, metavar="FILE.html", help="where to write the page")
    p.add_argument("--tracking-uri", default=None, metavar="URI",
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db)")
    add_verbose(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    uri = resolve_tracking_uri(args.tracking_uri)
    result = report(uri, args.sweep, args.out)
    print(f"wrote {result.path}: {', '.join(result.sections)}")
    for title, why in result.left_out.items():
        print(f"left out {title}: {why}")
    parents = ", ".join(s.parent_run_id for s in result.sweeps)
    print(f"logged to MLflow parent run {parents} under {ARTIFACT_DIR}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(standalone(add_parser, "report"))
