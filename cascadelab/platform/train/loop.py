"""The Ray Train worker loop: one loop for every objective and any number of stages.

Trains day by day in date order (one Ray Dataset shard per day), checkpoints after each day, evaluates
on the held-out day at the end. Rank 0 logs per-day metrics to MLflow (step = day index). Resumes from
``ray.train.get_checkpoint()`` after a worker failure: finished days are skipped.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from cascadelab.cascade.batch import CascadeBatch
from cascadelab.cascade.cascade import Cascade
from cascadelab.cascade.metrics import finalize, metric_sums
from cascadelab.platform.config import CascadeConfig, from_dict
from cascadelab.platform.data.ingest import ArrowToTorch
from cascadelab.platform.tracking import log_metrics

log = logging.getLogger(__name__)
CHECKPOINT_FILE = "cascade.pt"


def build_cascade(cfg: CascadeConfig, vocab: dict[str, int]) -> Cascade:
    return Cascade([s.model for s in cfg.stages], [s.k for s in cfg.stages], vocab, cfg.objective.name,
                   dict(vars(cfg.objective)), emb_dim=cfg.model.emb_dim, hidden=cfg.model.hidden)


def _all_reduce(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum a dict of floats over workers (identity with one worker)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist(), strict=True))


def _unwrap(model: torch.nn.Module) -> Cascade:
    return model.module if hasattr(model, "module") else model


def evaluate(model: torch.nn.Module, shard, collate: ArrowToTorch, batch_size: int,
             device: torch.device) -> dict[str, float]:
    """Metric means over this worker's shard of the evaluation day, summed over all workers."""
    cascade = _unwrap(model)
    cascade.eval()
    sums: dict[str, float] = {}
    with torch.no_grad():
        for tensors in shard.iter_torch_batches(batch_size=batch_size, collate_fn=collate, device=device):
            batch = CascadeBatch.from_dict(tensors)
            for key, value in metric_sums(cascade.scores(batch), cascade.ks, batch).items():
                sums[key] = sums.get(key, 0.0) + value
    cascade.train()
    sums = _all_reduce(sums, device)
    return finalize(sums)


def _progress(enabled: bool, rank: int, desc: str, total: int):
    """A per-day progress bar rendered by the driver (rank 0 only, when the driver has a terminal)."""
    if not enabled or rank != 0 or os.environ.get("TQDM_DISABLE"):
        return None
    from ray.experimental import tqdm_ray

    return tqdm_ray.tqdm(desc=desc, total=total, unit="step")


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, float]:
    import ray.train
    from ray.train.torch import get_device, prepare_model

    if not logging.getLogger().handlers:  # worker processes start without logging configured
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = from_dict(loop_config["config"])
    days: list[str] = loop_config["train_days"]
    groups = tuple(loop_config["groups"])
    uri, run_id = loop_config["tracking_uri"], loop_config["run_id"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(loop_config.get("torch_threads") or 1)
    torch.manual_seed(cfg.train.seed)
    device = get_device()

    model = build_cascade(cfg, loop_config["vocab"])
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    start_day, history = 0, {"train_rows": 0.0, "train_s": 0.0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_day, history = state["next_day"], state["history"]
        log.info("rank %d resumed from checkpoint at day %d", rank, start_day)
    model = prepare_model(model)
    collate = ArrowToTorch(groups)

    metrics: dict[str, float] = {}
    rows_per_day: dict[str, int] = loop_config.get("rows_per_day", {})
    for day_index in range(start_day, len(days)):
        day = days[day_index]
        shard = ray.train.get_dataset_shard(f"train-{day}")
        bar = _progress(loop_config.get("progress", False), rank, f"day {day_index + 1}/{len(days)} {day}",
                        -(-rows_per_day.get(day, 0) // (world * cfg.data.batch_size)))
        rows, loss_sum, steps, wait_s, first_wait = 0, 0.0, 0, 0.0, 0.0
        comp_sums: dict[str, float] = {}
        t_day = time.perf_counter()
        t_wait = time.perf_counter()
        for tensors in shard.iter_torch_batches(batch_size=cfg.data.batch_size, collate_fn=collate,
                                                device=device,
                                                local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
                                                local_shuffle_seed=cfg.train.seed + day_index):
            waited = time.perf_counter() - t_wait
            if steps == 0:
                first_wait = waited  # pipeline start-up of this day's dataset
            else:
                wait_s += waited
            batch = CascadeBatch.from_dict(tensors)
            _, out = model(batch)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            # accumulate on device; read back once per day (no per-step host sync)
            loss_sum += out.loss.detach()
            for key, value in out.components.items():
                comp_sums[key] = comp_sums.get(key, 0.0) + value
            rows += batch.size
            steps += 1
            if bar is not None:
                bar.update(1)
            t_wait = time.perf_counter()
        if bar is not None:
            bar.close()
        day_s = time.perf_counter() - t_day
        busy_s = max(day_s - first_wait, 1e-9)  # steady state: after the first batch arrived
        local = {"rows": float(rows), "steps": float(steps), "loss": float(loss_sum), "wait_s": wait_s,
                 "busy_s": busy_s, **{k: float(v) for k, v in comp_sums.items()}}
        tot = _all_reduce(local, device)
        history["train_rows"] += tot["rows"]
        history["train_s"] += busy_s
        n_steps = max(tot["steps"], 1.0)
        metrics = {
            "train_loss": tot["loss"] / n_steps,
            **{k: tot[k] / n_steps for k in comp_sums},
            "samples_per_s": tot["rows"] / busy_s,  # global: all workers' rows / steady-state wall time
            "samples_per_s_per_worker": rows / busy_s,
            "step_time_s": busy_s / max(steps, 1),
            "data_wait_share": wait_s / busy_s,
            "first_batch_s": first_wait,
            "day_index": float(day_index),
        }
        if rank == 0:
            log_metrics(uri, run_id, metrics, step=day_index)
            log.info("day %d/%d %s: loss %.4f, %.0f samples/s, data wait %.1f%%", day_index + 1, len(days), day,
                     metrics["train_loss"], metrics["samples_per_s"], 100 * metrics["data_wait_share"])
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                state = {"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                         "next_day": day_index + 1, "history": history, "config": loop_config["config"],
                         "vocab": loop_config["vocab"], "days": days}
                torch.save(state, os.path.join(tmp, CHECKPOINT_FILE))
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({**metrics, "day": day}, checkpoint=ckpt)

    eval_metrics = evaluate(model, ray.train.get_dataset_shard("eval"), collate, cfg.data.eval_batch_size, device)
    final = {**eval_metrics, "samples_per_s": history["train_rows"] / max(history["train_s"], 1e-9),
             "train_rows": history["train_rows"], "world_size": float(world)}
    ray.train.report(final)
    return final  # rank 0's value reaches the driver as Result.return_value
