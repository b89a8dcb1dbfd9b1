"""``cascadelab generate``: write the synthetic RecFlow-shaped dataset (the embedded default data)."""

from __future__ import annotations

import argparse
import logging
import time

from cascadelab.jobs.common import standalone
from cascadelab.platform.config import ConfigError, parse_override
from cascadelab.platform.data.schema import ID_VOCAB_FIELDS, DatasetMeta
from cascadelab.platform.data.synthetic import SyntheticConfig, generate

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="write synthetic RecFlow-shaped Parquet data",
                       description="Write a synthetic dataset in the project's RecFlow Parquet schema: one "
                                   "directory per day, one row per request, with a planted user-item "
                                   "preference and a popularity skew. Deterministic for a seed. dataset.json "
                                   "records the joint recall of the oracle (the noise-free utility), "
                                   "popularity-only and random rankings. The dataset is written beside --out "
                                   "and moved into place when complete.")
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--days", type=int, default=SyntheticConfig.days)
    p.add_argument("--requests-per-day", type=int, default=SyntheticConfig.requests_per_day)
    p.add_argument("--seed", type=int, default=SyntheticConfig.seed)
    p.add_argument("--start-day", default=SyntheticConfig.start_day, help="first day, YYYY-MM-DD")
    p.add_argument("--three-stage", action="store_true", help="also write rerank_pos / rerank_neg groups")
    p.add_argument("--vocab", action="append", default=[], metavar="FIELD=N",
                   help=f"vocabulary size of one id field (repeatable); fields: {', '.join(ID_VOCAB_FIELDS)}")
    d = SyntheticConfig()
    p.add_argument("--popularity-skew", type=float, default=d.popularity_skew,
                   help=f"Zipf exponent of item popularity (default {d.popularity_skew})")
    p.add_argument("--preference-strength", type=float, default=d.preference_strength,
                   help=f"weight of the planted user-item affinity (default {d.preference_strength})")
    p.add_argument("--popularity-weight", type=float, default=d.popularity_weight,
                   help=f"weight of log-popularity in the utility (default {d.popularity_weight})")
    p.add_argument("--funnel-noise", type=float, default=d.funnel_noise,
                   help=f"noise of the simulated production ranking (default {d.funnel_noise})")
    p.add_argument("--item-spread", type=float, default=d.item_spread,
                   help="sd of an item's own latent part around its category's; smaller: items of a category "
                        f"are closer to alike and the preference is learnt from categories (default {d.item_spread})")
    p.add_argument("--rows-per-file", type=int, default=d.rows_per_file,
                   help=f"requests per Parquet file, also the unit of parallel work (default {d.rows_per_file})")
    p.add_argument("--parallel", action=argparse.BooleanOptionalAction, default=None,
                   help="write files as Ray tasks (default: above a million requests or inside a Ray job)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=main)


def parse_vocab(items: list[str]) -> dict[str, int]:
    """``FIELD=N`` pairs (parsed like ``--set``, :func:`cascadelab.platform.config.parse_override`) ->
    vocabulary overrides; ConfigError naming --vocab on bad input."""
    out = {}
    for item in items:
        try:
            name, n = parse_override(item)
        except ConfigError:
            name, n = "", None
        if name not in ID_VOCAB_FIELDS:
            raise ConfigError(f"--vocab {item}: expected FIELD=N with FIELD one of {', '.join(ID_VOCAB_FIELDS)}")
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ConfigError(f"--vocab {item}: expected a positive integer size, got {n!r}")
        out[name] = n
    return out


def main(args: argparse.Namespace) -> int:
    if args.rows_per_file <= 0:
        raise ConfigError(f"--rows-per-file: expected a positive number of requests, got {args.rows_per_file}")
    if args.popularity_skew < 0 or args.funnel_noise < 0 or args.item_spread < 0:
        raise ConfigError("--popularity-skew, --funnel-noise and --item-spread: expected values >= 0")
    cfg = SyntheticConfig(days=args.days, requests_per_day=args.requests_per_day, seed=args.seed,
                          start_day=args.start_day, mode="three_stage" if args.three_stage else "two_stage",
                          popularity_skew=args.popularity_skew, preference_strength=args.preference_strength,
                          popularity_weight=args.popularity_weight, funnel_noise=args.funnel_noise,
                          item_spread=args.item_spread, rows_per_file=args.rows_per_file)
    cfg.vocab.update(parse_vocab(args.vocab))
    t0 = time.perf_counter()
    meta = generate(cfg, args.out, overwrite=args.overwrite, parallel=args.parallel)
    log.info("generated in %.1f s", time.perf_counter() - t0)
    print(f"wrote {sum(meta.rows_per_day.values())} requests over {len(meta.days)} days to {args.out}")
    print(reference_line(meta))
    return 0


def reference_line(meta: DatasetMeta) -> str:
    """What reference rankings of the logged candidates score (dataset.json ``extra.oracle``, all days)."""
    oracle = meta.extra["oracle"]
    o = oracle[meta.mode]["overall"]
    return (f"joint R@{oracle['gt_k']}@{oracle['k']} of the logged candidates ranked by the noise-free utility "
            f"(oracle) {o['oracle']:.4f}, affinity only {o['affinity']:.4f}, popularity only "
            f"{o['popularity']:.4f}, random {o['random']:.4f}")


if __name__ == "__main__":
    raise SystemExit(standalone(add_parser, "generate"))
