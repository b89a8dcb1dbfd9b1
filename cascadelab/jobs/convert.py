"""``cascadelab convert recflow``: convert the public RecFlow release into the project's Parquet dataset."""

from __future__ import annotations

import argparse
import logging

from cascadelab.jobs.common import standalone
from cascadelab.platform.data.recflow import convert_recflow, find_layout, select_days
from cascadelab.platform.data.schema import groups_for

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a public dataset into the project's Parquet schema",
                       description="Convert a public dataset into the project's day-partitioned Parquet "
                                   "schema (one row per request).")
    formats = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    r = formats.add_parser(
        "recflow", help="the RecFlow release (all_stage/, seq_effective_50_dict/, request_id_dict/, others/)",
        description="Convert the RecFlow release (Kuaishou cascade dataset) day by day. Each day is written "
                    "atomically and dataset.json is updated after it, so an interrupted run can be resumed: "
                    "days already converted are skipped unless --force.")
    r.add_argument("--src", required=True, help="the release directory (holding all_stage/ or data/all_stage/)")
    r.add_argument("--out", required=True, help="output dataset directory")
    r.add_argument("--days", help="comma-separated days YYYY-MM-DD (default: every day in all_stage/)")
    r.add_argument("--start-day", help="first day, YYYY-MM-DD (default: the first day in all_stage/)")
    r.add_argument("--end-day", help="last day, inclusive, YYYY-MM-DD (default: the last day in all_stage/)")
    r.add_argument("--mode", default="two_stage",
                   help="two_stage (rank_pos + 3 negative groups) or three_stage (adds rerank_pos, rerank_neg)")
    r.add_argument("--force", action="store_true", help="rewrite days that are already converted")
    r.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    groups_for(args.mode)  # an unknown mode is a one-line DataError before any file is read
    layout = find_layout(args.src)
    days = select_days(layout, args.days.split(",") if args.days is not None else None,
                       args.start_day, args.end_day)
    meta = convert_recflow(args.src, args.out, days=days, mode=args.mode, force=args.force)
    misses = meta.extra.get("lookup_misses_total", {})
    print(f"converted RecFlow {days[0]}..{days[-1]} ({meta.mode}) to {args.out}: "
          f"{sum(meta.rows_per_day.values())} requests over {len(meta.days)} days; lookup misses {misses}")
    return 0


if __name__ == "__main__":
    raise SystemExit(standalone(add_parser, "convert"))
