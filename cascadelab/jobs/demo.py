"""``cascadelab demo`` (what ``make demo`` runs): synthetic data, then BCE and DFTopK on Ray over a few seeds,
then a table of means and each method's gap to the first one with its 95% interval (paired by seed)."""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

from cascadelab.cascade.metrics import stage_names
from cascadelab.jobs.common import add_config_args, standalone
from cascadelab.platform.config import CascadeConfig, load_config, parse_override, unflatten
from cascadelab.platform.data.schema import METADATA_FILE
from cascadelab.platform.data.synthetic import SyntheticConfig, generate
from cascadelab.platform.tracking import client, ui_url
from cascadelab.platform.train.run import run_training
from cascadelab.platform.tune.compare import LEVEL, difference

log = logging.getLogger(__name__)

_SHORT = {"retrieval": "retr", "ranking": "rank"}  # column titles abbreviate the outer stages
_SPEED = [("samples_per_s", "samples/s"), ("wall_time_s", "wall s")]
EXPERIMENT = "cascadelab-demo"
UI_SERVER = "http://127.0.0.1:5000"  # where `make ui` serves the MLflow UI


def columns(cfg: CascadeConfig) -> list[tuple[str, str]]:
    """``(metric key, title)`` of the table: joint recall, every stage's recall and NDCG in cascade order
    (``retr R@10@30``: Recall@gt_k@k of that stage), then throughput and wall time."""
    gt = cfg.objective.gt_k
    cols = [("joint_recall", f"joint R@{gt}@{cfg.stages[-1].k}")]
    for name, stage in zip(stage_names(len(cfg.stages)), cfg.stages, strict=True):
        short = _SHORT.get(name, name)
        cols += [(f"{name}_recall", f"{short} R@{gt}@{stage.k}"), (f"{name}_ndcg", f"{short} NDCG@10")]
    return cols + _SPEED


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="end-to-end demo: generate data, train bce and dftopk, print a table",
                       description="Generate a small synthetic dataset (if missing), train the two-stage "
                                   "cascade with each objective on the embedded local Ray cluster, track "
                                   "both runs in MLflow and print a comparison table.")
    p.add_argument("--data", default="data/demo", help="dataset directory (generated when missing)")
    p.add_argument("--days", type=int, default=4, help="days to generate (the last one is held out)")
    p.add_argument("--requests-per-day", type=int, default=4096)
    p.add_argument("--objectives", default="bce,dftopk", help="comma-separated objective names; the first is "
                   "the baseline of the printed gaps")
    p.add_argument("--seeds", type=int, default=3, help="training seeds per objective: train.seed, "
                   "train.seed + 1, ... (train.seed: 42 unless set); the gaps' intervals are paired by seed (N >= 2)")
    add_config_args(p)
    p.set_defaults(func=main)


def format_table(rows: list[tuple[str, dict[str, float]]], cols: list[tuple[str, str]]) -> str:
    """One line per ``(method, metrics)`` of ``rows``, one column per ``(key, title)`` of ``cols``."""
    header = ["method"] + [title for _, title in cols]
    lines = [header]
    for name, m in rows:
        cells = [name]
        for key, _ in cols:
            v = m.get(key, float("nan"))
            cells.append(f"{v:.0f}" if key in ("samples_per_s",) else f"{v:.1f}" if key == "wall_time_s"
                         else f"{v:.4f}")
        lines.append(cells)
    widths = [max(len(r[i]) for r in lines) for i in range(len(header))]
    out = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in lines]
    out.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(out)


def gap_lines(runs: dict[str, list[tuple[int, dict[str, float]]]], key: str = "joint_recall") -> list[str]:
    """One line per method after the first of ``runs`` (``name -> [(seed, metrics), ...]``): its mean
    ``key`` minus the first method's, with the paired 95% interval and whether it excludes 0."""
    names = list(runs)
    base = [(seed, m[key]) for seed, m in runs[names[0]]]
    lines = []
    for name in names[1:]:
        d = difference([(seed, m[key]) for seed, m in runs[name]], base)
        n = len(runs[name])
        if d.lo is None:
            lines.append(f"{name} - {names[0]}: {d.mean:+.4f} (n={n}: no interval; use --seeds 2 or more)")
            continue
        verdict = ("outside seed noise" if d.significant else
                   "NOT outside seed noise: train longer (more requests per day) or with more seeds")
        lines.append(f"{name} - {names[0]}: {d.mean:+.4f}, {LEVEL:.0%} interval [{d.lo:+.4f}, {d.hi:+.4f}] "
                     f"({d.test} over {n} seeds): {verdict}")
    return lines


def mean_metrics(runs: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """The mean over seeds of every metric the runs share."""
    keys = set.intersection(*(set(m) for _, m in runs))
    return {k: statistics.fmean(m[k] for _, m in runs) for k in keys}


def main(args: argparse.Namespace) -> int:
    data = Path(args.data)
    if args.seeds < 1:
        raise SystemExit(f"--seeds should be >= 1 but got {args.seeds}")
    if not (data / METADATA_FILE).is_file():
        log.info("generating %d days x %d requests into %s", args.days, args.requests_per_day, data)
        generate(SyntheticConfig(days=args.days, requests_per_day=args.requests_per_day), data,
                 overwrite=data.exists())
    runs: dict[str, list[tuple[int, dict[str, float]]]] = {}
    t0 = time.perf_counter()
    for name in [o.strip() for o in args.objectives.split(",") if o.strip()]:
        settings = {"data.path": str(data), "data.batch_size": 512, "objective.name": name,
                    "tracking.experiment": EXPERIMENT, **dict(map(parse_override, args.overrides))}
        first_seed = load_config(args.config, unflatten(settings)).train.seed  # --set last: it wins
        runs[name] = []
        for seed in range(first_seed, first_seed + args.seeds):
            cfg = load_config(args.config, unflatten({**settings, "train.seed": seed}))
            log.info("training %s, seed %d", name, seed)
            result = run_training(cfg)
            runs[name].append((seed, result.metrics))
            uri = result.tracking_uri
    print()
    print(format_table([(name, mean_metrics(r)) for name, r in runs.items()], columns(cfg)))
    print(f"(means over {args.seeds} seed{'s' if args.seeds > 1 else ''}; joint recall on the held-out day)")
    for line in gap_lines(runs):
        print(line)
    n_runs = sum(len(r) for r in runs.values())
    print(f"\n{n_runs} runs in MLflow experiment '{EXPERIMENT}' at {uri} "
          f"(total {time.perf_counter() - t0:.0f} s).")
    print(f"Open them in the MLflow UI: make ui, then {ui_hint(uri)}")
    return 0


def ui_hint(uri: str) -> str:
    """The demo experiment's page in the UI ``make ui`` serves (the "Model training" view); the UI's
    address alone when the experiment is not in ``uri``'s store."""
    exp = client(uri).get_experiment_by_name(EXPERIMENT)
    return ui_url(UI_SERVER, exp.experiment_id) if exp is not None else UI_SERVER


if __name__ == "__main__":
    raise SystemExit(standalone(add_parser, "demo"))
