"""``cascadelab submit`` and ``cascadelab jobs``: run cascadelab jobs on a Ray cluster via the Jobs API.

    cascadelab submit [--address URL] [--working-dir DIR] [--env KEY=VALUE ...] [--no-wait] [--no-tail]
                      -- JOB [JOB ARGS ...]
    cascadelab jobs list   [--address URL]
    cascadelab jobs status ID [--address URL]
    cascadelab jobs logs   ID [--address URL] [--follow]
    cascadelab jobs stop   ID [--address URL] [--wait]

``JOB`` is a module of ``cascadelab.jobs`` (``train``, ``sweep``, ...); the cluster runs
``python -m cascadelab.jobs.JOB ARGS`` with this project directory uploaded as the working dir.
Exit codes: 0 job SUCCEEDED (or submitted, with --no-wait), 1 job FAILED or STOPPED,
2 bad input or unreachable cluster, 130 interrupted (the job keeps running).

Also runnable as ``python -m cascadelab.jobs.submit [submit options] -- JOB ...`` and
``python -m cascadelab.jobs.submit jobs list``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import datetime

from cascadelab.jobs import add_parser_of, submittable
from cascadelab.jobs.common import run_main, setup_logging
from cascadelab.platform.cluster.jobs import (
    ADDRESS_ENV,
    DEFAULT_ADDRESS,
    ClusterError,
    exit_code,
    job_logs,
    job_status,
    list_jobs,
    split_job_argv,
    stop_job,
    submit,
)

log = logging.getLogger(__name__)

_ADDRESS_HELP = (f"Ray Jobs API (dashboard) URL of the head, e.g. http://HEAD:8265; default: "
                 f"${ADDRESS_ENV[0]}, else ${ADDRESS_ENV[1]}, else {DEFAULT_ADDRESS}")


def _address_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", metavar="URL", help=_ADDRESS_HELP)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "submit", help="run a cascadelab job on a Ray cluster (Ray Jobs API)",
        usage="%(prog)s [--address URL] [--working-dir DIR] [--env KEY=VALUE] [--no-wait] [--no-tail] "
              "-- JOB [ARGS ...]",
        description="Submit `python -m cascadelab.jobs.JOB ARGS` to a Ray cluster, with this project "
                    "directory as the job's working_dir (data, results, mlflow.db, .venv and .git are "
                    "left out), print the job id and follow its logs until it ends. Paths in ARGS are "
                    "paths on the cluster: pass absolute/shared data and storage paths and the "
                    "cluster's MLflow server, e.g. -- train --set data.path=/shared/data "
                    "--set tracking.uri=http://HEAD:5000.",
        epilog="exit status: 0 SUCCEEDED (or submitted with --no-wait), 1 FAILED/STOPPED, 2 bad input or "
               "unreachable cluster")
    _address_arg(p)
    p.add_argument("--working-dir", default=".", metavar="DIR",
                   help="project directory to upload as the job's working_dir (default: .)")
    p.add_argument("--env", dest="env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment variable for the job (repeatable); RAY_AUTH_MODE and "
                        "MLFLOW_TRACKING_URI are passed through when set")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    p.add_argument("--no-tail", action="store_true", help="wait for the job without streaming its logs")
    p.add_argument("job", nargs=argparse.REMAINDER, metavar="-- JOB [ARGS ...]",
                   help="a cascadelab job (train, sweep, ...) and its arguments")
    p.set_defaults(func=main)

    j = sub.add_parser("jobs", help="list, inspect, follow or stop jobs on a Ray cluster",
                       description="Jobs on the Ray cluster at --address (any job, not only cascadelab's).")
    jsub = j.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    pl = jsub.add_parser("list", help="list jobs with their status")
    _address_arg(pl)
    ps = jsub.add_parser("status", help="print a job's status")
    ps.add_argument("job_id", metavar="ID")
    _address_arg(ps)
    pg = jsub.add_parser("logs", help="print a job's logs")
    pg.add_argument("job_id", metavar="ID")
    pg.add_argument("-f", "--follow", action="store_true", help="stream the logs until the job ends")
    _address_arg(pg)
    pt = jsub.add_parser("stop", help="stop a running job")
    pt.add_argument("job_id", metavar="ID")
    pt.add_argument("--wait", action="store_true", help="wait until the job has stopped")
    _address_arg(pt)
    j.set_defaults(func=main)


def _parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ClusterError(f"--env '{item}': expected KEY=VALUE")
        env[key.strip()] = value
    return env


def _time(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def _print_jobs(jobs: list) -> None:
    rows = [("ID", "STATUS", "STARTED", "ENTRYPOINT")]
    for j in jobs:
        entry = j.entrypoint if len(j.entrypoint) <= 80 else j.entrypoint[:77] + "..."
        rows.append((j.submission_id or j.job_id or "-", str(getattr(j.status, "value", j.status)),
                     _time(j.start_time), entry))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3])


def _run(args: argparse.Namespace) -> int:
    if args.command == "submit":
        name, rest = split_job_argv(args.job, submittable())
        job_id = submit(name, rest, add_parser_of(name), address=args.address, working_dir=args.working_dir,
                        env_vars=_parse_env(args.env), wait=not args.no_wait, tail=not args.no_tail)
        if args.no_wait:
            return 0
        return exit_code(job_status(job_id, args.address))  # a failure was logged by wait_for_job
    action = args.jobs_command
    if action == "list":
        _print_jobs(list_jobs(args.address))
    elif action == "status":
        print(job_status(args.job_id, args.address))
    elif action == "logs":
        text = job_logs(args.job_id, args.address, follow=args.follow)
        sys.stdout.write(text)
    elif action == "stop":
        print(stop_job(args.job_id, args.address, wait=args.wait))
    return 0


def main(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except ClusterError as exc:
        print(f"cascadelab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        note = "; a submitted job keeps running (cascadelab jobs stop ID)" if args.command == "submit" else ""
        print(f"cascadelab: interrupted{note}", file=sys.stderr)
        return 130


def _standalone(argv: list[str] | None = None) -> int:
    """``python -m cascadelab.jobs.submit ...``: ``submit`` is implied unless the first word is ``jobs``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("submit", "jobs", "-h", "--help"):
        argv = ["submit", *argv]
    parser = argparse.ArgumentParser(prog="python -m cascadelab.jobs.submit")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return run_main(args.func, args)


if __name__ == "__main__":
    raise SystemExit(_standalone())
