"""``cascadelab score --run RUN --data DIR --out FILE``: score requests with a training run's MLflow model.

The run's cascade (logged with ``mlflow.pytorch`` at the end of training) scores every request of the
chosen days of ``DIR`` (a dataset in the project's Parquet schema); ``FILE`` gets one JSON line per
request: ``{"day", "row", "<stage>": [candidate slots of that stage's top-k, best first], ...}``, where
stage ``s`` ranks only what stage ``s-1`` kept (the cascade as it serves) and a slot indexes the
request's candidate list (groups in cascade order, ``cascade.batch``). mlflow is imported lazily.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cascadelab.cascade.metrics import select_topk
from cascadelab.jobs.common import add_verbose, standalone
from cascadelab.platform.config import ConfigError
from cascadelab.platform.data.ingest import arrow_to_tensors
from cascadelab.platform.data.schema import DatasetMeta, day_dir_files, groups_for
from cascadelab.platform.tracking import MODEL_NAME, Tracker, resolve_tracking_uri, runs_named


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score requests with a training run's MLflow model (top-k per stage)",
                       description="Load the cascade a training run logged as its MLflow model and write each "
                                   "stage's top-k candidates for every request of a dataset (JSON lines).")
    p.add_argument("--run", required=True, metavar="RUN", help="the training run: its MLflow run id or name")
    p.add_argument("--data", required=True, metavar="DIR", help="dataset directory (the project's Parquet schema)")
    p.add_argument("--out", required=True, metavar="FILE", help="output file, JSON lines (one per request)")
    p.add_argument("--days", default=None, help="comma-separated days to score (default: the last day)")
    p.add_argument("--experiment", default="cascadelab", help="MLflow experiment of a run given by name")
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else ./mlflow.db")
    p.add_argument("--batch-size", type=int, default=1024)
    add_verbose(p)
    p.set_defaults(func=main)


def find_model_run(uri: str, experiment: str, run: str) -> Tracker:
    """The run ``run`` (an id, else a run name in ``experiment``) that logged a model."""
    store = Tracker(uri, run).client
    try:
        found = store.get_run(run)
    except Exception:  # noqa: BLE001 - not an id of this store: look it up by name
        named = runs_named(uri, experiment, run)
        if len(named) != 1:
            raise ConfigError(f"--run {run}: expected one MLflow run with that id or name in experiment "
                              f"'{experiment}' at {uri}, found {len(named)}") from None
        found = named[0]
    if "cascadelab.model_uri" not in found.data.tags:
        raise ConfigError(f"--run {run}: the run logged no model (a run that did not finish, or one "
                          f"trained before models were logged)")
    return Tracker(uri, found.info.run_id)


def load_scorer(tracker: Tracker) -> torch.nn.Module:
    import mlflow
    import mlflow.pytorch

    mlflow.set_tracking_uri(tracker.uri)
    tags = tracker.client.get_run(tracker.run_id).data.tags
    uri = tags.get("cascadelab.model_uri", f"runs:/{tracker.run_id}/{MODEL_NAME}")
    return mlflow.pytorch.load_model(uri, map_location="cpu").eval()


def top_k_per_stage(scores: dict[str, torch.Tensor], ks: list[int], mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{stage: [B, k] slot indices}`` best first; stage ``s`` ranks what stage ``s-1`` kept (-1 pads)."""
    kept, out = mask, {}
    for (name, s), k in zip(scores.items(), ks, strict=True):
        chosen = select_topk(s, k, kept)
        ranked = s.masked_fill(~chosen, float("-inf")).topk(min(k, s.shape[-1]), dim=-1)
        out[name] = ranked.indices.masked_fill(~torch.isfinite(ranked.values), -1)
        kept = chosen
    return out


def score_days(scorer: torch.nn.Module, data: Path, days: list[str], out: Path, batch_size: int) -> int:
    """Write the JSON lines of every request of ``days``; returns the number of requests scored."""
    meta = DatasetMeta.read(data)
    groups = groups_for("three_stage" if len(scorer.ks) >= 3 else "two_stage")
    rows = 0
    with out.open("w") as f, torch.no_grad():
        for day in days:
            if day not in meta.days:
                raise ConfigError(f"--days: '{day}' is not a day of {data} (days: {', '.join(meta.days)})")
            row = 0
            for path in day_dir_files(data, day):
                for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
                    tensors = arrow_to_tensors(pa.Table.from_batches([batch]), groups)
                    top = top_k_per_stage(scorer(tensors), scorer.ks, tensors["mask"])
                    for i in range(batch.num_rows):
                        kept = {n: [j for j in t[i].tolist() if j >= 0] for n, t in top.items()}
                        f.write(json.dumps({"day": day, "row": row + i, **kept}) + "\n")
                    row += batch.num_rows
            rows += row
    return rows


def main(args: argparse.Namespace) -> int:
    data = Path(args.data)
    meta = DatasetMeta.read(data)
    days = [d.strip() for d in args.days.split(",")] if args.days else [sorted(meta.days)[-1]]
    tracker = find_model_run(resolve_tracking_uri(args.tracking_uri), args.experiment, args.run)
    scorer = load_scorer(tracker)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = score_days(scorer, data, days, out, args.batch_size)
    print(f"scored {n} requests of {', '.join(days)} with run {tracker.run_id}'s model: {out} (JSON lines)")
    return 0


if __name__ == "__main__":
    raise SystemExit(standalone(add_parser, "score"))
