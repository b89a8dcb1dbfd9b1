"""``cascadelab generate``: write the synthetic RecFlow-shaped dataset (the embedded default data)."""

from __future__ import annotations

import argparse
import logging

from cascadelab.jobs.common import standalone
from cascadelab.platform.data.synthetic import SyntheticConfig, generate

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="write synthetic RecFlow-shaped Parquet data",
                       description="Write a synthetic dataset in the project's RecFlow Parquet schema: one "
                                   "directory per day, one row per request, with a planted user-item "
                                   "preference and a popularity skew. Deterministic for a seed.")
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--days", type=int, default=SyntheticConfig.days)
    p.add_argument("--requests-per-day", type=int, default=SyntheticConfig.requests_per_day)
    p.add_argument("--seed", type=int, default=SyntheticConfig.seed)
    p.add_argument("--start-day", default=SyntheticConfig.start_day, help="first day, YYYY-MM-DD")
    p.add_argument("--three-stage", action="store_true", help="also write rerank_pos / rerank_neg groups")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    cfg = SyntheticConfig(days=args.days, requests_per_day=args.requests_per_day, seed=args.seed,
                          start_day=args.start_day, mode="three_stage" if args.three_stage else "two_stage")
    meta = generate(cfg, args.out, overwrite=args.overwrite)
    print(f"wrote {sum(meta.rows_per_day.values())} requests over {len(meta.days)} days to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(standalone(add_parser, "generate"))
