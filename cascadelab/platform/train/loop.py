"""The Ray Train worker loop: one loop for every objective and any number of stages.

Trains day by day in date order (one Ray Dataset shard per day). Checkpoints after each day and, if
``train.checkpoint_every_steps > 0``, every N steps; the checkpoint records the day and the number of
batches of that day already trained, so a replaced worker group resumes exactly there (earlier batches
of the day are read and skipped, never trained twice; the order is deterministic because training
datasets are read with ``preserve_order``). With ``train.streaming_eval`` the model trained on the days
before ``t`` is evaluated on day ``t`` (the papers' Figure 2 protocol). Rank 0 logs to MLflow
(step = day index). Every rank calls ``ray.train.report`` the same number of times (it is a barrier).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
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


class InjectedFailure(RuntimeError):
    """Raised once by ``train.fail_at_step`` to test fault tolerance."""


@dataclass
class LoopState:
    """Progress a checkpoint carries besides the weights."""

    day: int = 0  # index of the day in progress
    step_in_day: int = 0  # batches of that day already trained
    global_step: int = 0
    train_rows: float = 0.0  # rows trained by all workers in committed steps
    train_s: float = 0.0  # steady-state training time of committed steps


def build_cascade(cfg: CascadeConfig, vocab: dict[str, int]) -> Cascade:
    return Cascade([s.model for s in cfg.stages], [s.k for s in cfg.stages], vocab, cfg.objective.name,
                   dict(vars(cfg.objective)), emb_dim=cfg.model.emb_dim, hidden=cfg.model.hidden)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum a dict of floats over workers (identity with one worker)."""
    if not _distributed():
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist(), strict=True))


def _per_worker(value: float, rank: int, world: int, device: torch.device) -> list[float]:
    """Every worker's ``value``, indexed by rank."""
    t = torch.zeros(world, dtype=torch.float64, device=device)
    t[rank] = value
    if _distributed():
        dist.all_reduce(t)
    return t.tolist()


def _unwrap(model: torch.nn.Module) -> Cascade:
    return model.module if hasattr(model, "module") else model


def evaluate(model: torch.nn.Module, shard, collate: ArrowToTorch, batch_size: int,
             device: torch.device) -> dict[str, float]:
    """Metric means over the evaluation data (each worker scores its shard; sums are all-reduced)."""
    cascade = _unwrap(model)
    cascade.eval()
    sums: dict[str, float] = {}
    with torch.no_grad():
        for tensors in shard.iter_torch_batches(batch_size=batch_size, collate_fn=collate, device=device):
            batch = CascadeBatch.from_dict(tensors)
            for key, value in metric_sums(cascade.scores(batch), cascade.ks, batch).items():
                sums[key] = sums.get(key, 0.0) + value
    cascade.train()
    return finalize(_all_reduce(sums, device))


def _progress(enabled: bool, rank: int, desc: str, total: int):
    """A per-day progress bar rendered by the driver (rank 0 only, when the driver has a terminal)."""
    if not enabled or rank != 0 or os.environ.get("TQDM_DISABLE"):
        return None
    from ray.experimental import tqdm_ray

    return tqdm_ray.tqdm(desc=desc, total=total, unit="step")


def _maybe_fail(cfg: CascadeConfig, state: LoopState, rank: int, marker: str | None) -> None:
    """Fault injection for tests: rank ``train.fail_rank`` raises once when it reaches the chosen step."""
    if cfg.train.fail_at_step < 0 or state.global_step != cfg.train.fail_at_step or rank != cfg.train.fail_rank:
        return
    if marker is None or os.path.exists(marker):
        return
    Path(marker).parent.mkdir(parents=True, exist_ok=True)
    Path(marker).write_text(f"failed once at step {state.global_step}\n")
    raise InjectedFailure(f"injected failure at global step {state.global_step} on rank {rank}")


class _Trainer:
    """The per-worker training state and the steps of the loop (kept small so the loop reads top-down)."""

    def __init__(self, loop_config: dict[str, Any]):
        import ray.train
        from ray.train.torch import get_device, prepare_model

        self.lc = loop_config
        self.cfg = cfg = from_dict(loop_config["config"])
        self.days: list[str] = loop_config["train_days"]
        self.uri, self.run_id = loop_config["tracking_uri"], loop_config["run_id"]
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        torch.set_num_threads(loop_config.get("torch_threads") or 1)
        torch.manual_seed(cfg.train.seed)
        self.device = get_device()
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if cfg.train.bf16 and self.device.type == "cuda" else contextlib.nullcontext())
        model = build_cascade(cfg, loop_config["vocab"])
        self.optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
        self.state = LoopState()
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                saved = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
            model.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
            self.state = LoopState(**saved["state"])
            log.info("rank %d resumed at day %d, batch %d (global step %d)", self.rank, self.state.day,
                     self.state.step_in_day, self.state.global_step)
        self.model = prepare_model(model)
        self.groups = tuple(loop_config["groups"])
        self.eval_collate = self.collate_for(loop_config.get("eval_day", "eval"), evaluation=True)
        self._pending = {"rows": 0.0, "busy_s": 0.0}  # local progress since the last report

    def collate_for(self, day: str, evaluation: bool = False) -> ArrowToTorch:
        """The collate of one day's data: id/label checks naming the day, in-batch negatives."""
        data = self.cfg.data
        source = f"day '{day}' ({Path(data.path) / f'day={day}'})"
        if evaluation:
            return ArrowToTorch(self.groups, data.eval_sample_num, seed=1024 + self.rank,
                                vocab=self.lc["vocab"], source=source)
        return ArrowToTorch(self.groups, data.sample_num, seed=self.cfg.train.seed * 1000 + self.rank,
                            vocab=self.lc["vocab"], source=source)

    def step(self, batch: CascadeBatch) -> dict[str, torch.Tensor]:
        with self.autocast:
            _, out = self.model(batch)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self.optimizer.step()
        return {"loss": out.loss.detach(), **out.components}

    def report(self, metrics: dict[str, Any], checkpoint: bool) -> None:
        """Commit progress counters, then report (with a rank-0 checkpoint if asked) on every rank."""
        import ray.train

        tot = _all_reduce(self._pending, self.device)
        self.state.train_rows += tot["rows"]
        self.state.train_s += self._pending["busy_s"]
        self._pending = {"rows": 0.0, "busy_s": 0.0}
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if checkpoint and self.rank == 0:
                torch.save({"model": _unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                            "state": asdict(self.state), "config": self.lc["config"], "vocab": self.lc["vocab"],
                            "days": self.days}, os.path.join(tmp, CHECKPOINT_FILE))
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({**metrics, "global_step": self.state.global_step}, checkpoint=ckpt)

    def train_day(self, day_index: int) -> dict[str, float]:
        import ray.train

        cfg, st = self.cfg, self.state
        day = self.days[day_index]
        shard = ray.train.get_dataset_shard(f"train-{day}")
        skip = st.step_in_day if day_index == st.day else 0
        st.day, st.step_in_day = day_index, skip
        rows_day = self.lc.get("rows_per_day", {}).get(day, 0)
        bar = _progress(self.lc.get("progress", False), self.rank, f"day {day_index + 1}/{len(self.days)} {day}",
                        -(-rows_day // (self.world * cfg.data.batch_size)))
        rows, steps, wait_s, first_wait, busy_s = 0, 0, 0.0, 0.0, 0.0
        sums: dict[str, torch.Tensor] = {}
        t_seg = t_wait = time.perf_counter()  # start of the current timed segment
        for i, tensors in enumerate(shard.iter_torch_batches(
                batch_size=cfg.data.batch_size, collate_fn=self.collate_for(day), device=self.device,
                local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
                local_shuffle_seed=cfg.train.seed + day_index)):
            if i < skip:  # trained before a failure; the checkpoint already holds its update
                t_seg = t_wait = time.perf_counter()
                continue
            waited = time.perf_counter() - t_wait
            if steps == 0:
                first_wait = waited  # start-up of this day's pipeline, excluded from throughput
            else:
                wait_s += waited
            _maybe_fail(cfg, st, self.rank, self.lc.get("failure_marker"))
            batch = CascadeBatch.from_dict(tensors)
            for key, value in self.step(batch).items():  # stays on device: no per-step host sync
                sums[key] = sums.get(key, 0.0) + value
            rows += batch.size
            steps += 1
            st.global_step += 1
            st.step_in_day = i + 1
            self._pending["rows"] += batch.size
            if bar is not None:
                bar.update(1)
            every = cfg.train.checkpoint_every_steps
            if every > 0 and st.global_step % every == 0:
                seg = time.perf_counter() - t_seg - first_wait
                busy_s += seg
                self._pending["busy_s"] += seg
                self.report({"day": day, "mid_day": True}, checkpoint=True)
                t_seg, first_wait = time.perf_counter(), 0.0
            t_wait = time.perf_counter()
        if bar is not None:
            bar.close()
        seg = time.perf_counter() - t_seg - first_wait
        self._pending["busy_s"] += seg
        busy_s = max(busy_s + seg, 1e-9)
        local = {"rows": float(rows), "steps": float(steps), "wait_s": wait_s, "busy_s": busy_s,
                 **{k: float(v) for k, v in sums.items()}}
        tot = _all_reduce(local, self.device)
        n_steps = max(tot["steps"], 1.0)
        per_worker = _per_worker(rows / busy_s, self.rank, self.world, self.device)
        return {
            "train_loss": tot["loss"] / n_steps,
            **{k: tot[k] / n_steps for k in sums if k != "loss"},
            "samples_per_s": sum(per_worker),  # global: sum of the workers' steady-state rates
            **{f"samples_per_s_worker{r}": v for r, v in enumerate(per_worker)},
            "step_time_s": busy_s / max(steps, 1),
            "data_wait_share": wait_s / busy_s,
            "first_batch_s": first_wait,
        }


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, float]:
    import ray.train

    if not logging.getLogger().handlers:  # worker processes start without logging configured
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    t = _Trainer(loop_config)
    cfg, days = t.cfg, t.days
    stream_final: dict[str, float] | None = None
    for day_index in range(t.state.day, len(days)):
        metrics = t.train_day(day_index)
        t.state.day, t.state.step_in_day = day_index + 1, 0
        if cfg.train.streaming_eval:  # the model trained on days <= d, scored on the next day
            is_last = day_index + 1 == len(days)
            name = "eval" if is_last else f"train-{days[day_index + 1]}"
            collate = t.eval_collate if is_last else t.collate_for(days[day_index + 1], evaluation=True)
            stream = evaluate(t.model, ray.train.get_dataset_shard(name), collate,
                              cfg.data.eval_batch_size, t.device)
            metrics.update({f"stream_{k}": v for k, v in stream.items()})
            stream_final = stream if is_last else None
        if t.rank == 0:
            log_metrics(t.uri, t.run_id, metrics, step=day_index)
            log.info("day %d/%d %s: loss %.4f, %.0f samples/s, data wait %.1f%%", day_index + 1, len(days),
                     days[day_index], metrics["train_loss"], metrics["samples_per_s"],
                     100 * metrics["data_wait_share"])
        t.report({**metrics, "day": days[day_index]}, checkpoint=True)

    final = stream_final or evaluate(t.model, ray.train.get_dataset_shard("eval"), t.eval_collate,
                                     cfg.data.eval_batch_size, t.device)
    final = {**final, "samples_per_s": t.state.train_rows / max(t.state.train_s, 1e-9),
             "train_rows": t.state.train_rows, "global_steps": float(t.state.global_step),
             "world_size": float(t.world)}
    ray.train.report(final)
    return final  # rank 0's value reaches the driver as Result.return_value
