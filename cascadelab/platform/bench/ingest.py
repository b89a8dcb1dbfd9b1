"""Ingest throughput: rows/s delivered as torch batches by the Ray Data pipeline, per Train worker.

Three rates over the same day of Parquet files (the same columns, batch size and collate):

* ``pyarrow_floor``: one plain process (a fresh Ray task process, so its peak RSS is its own) reading the
  files with ``pyarrow.parquet.ParquetFile.iter_batches`` and collating every batch to torch with the
  pipeline's ``ArrowToTorch`` (in-batch negatives included): what delivering torch batches costs without
  Ray Data. ``pyarrow_read`` is the decode alone.
* ``ray_data_<w>_workers``: a Ray Train run of ``w`` workers whose loop only consumes its
  ``streaming_split`` shard (``iter_torch_batches`` with the collate and the local shuffle buffer of a
  training run) and counts rows; per-worker rows/s in steady state (from the first batch on; the time to
  the first batch, the pipeline's start-up, is reported apart) and end to end (start-up included).
* ``train_step``: rows/s of the training step itself (the default cascade: DSSM -> DIN, the configured
  objective) on pre-collated in-memory batches, in a process with the Train worker's CPU reservation and
  torch threads: how fast one worker can consume.

Ratios: ``ingest_over_train_step_<w>_workers`` = the slowest worker's ingest rate / the training step's
rate (target >= 3: ingest is never the bottleneck), ``ingest_over_pyarrow_floor_<w>_workers`` = per-worker
ingest rate / the floor (target >= 0.5). Peak memory: the peak RSS of the floor process and of each Train
worker, and the peak of the summed PSS (shared object-store pages split between their users, so counted
once) over every Ray worker process (Train workers and Ray Data tasks), sampled every 0.25 s.

The day must be much larger than what Ray Data prefetches before the first batch, or the steady-state
rate only measures draining a buffer (the default day has 262,144 requests). ray and matplotlib are
imported lazily (inside functions).
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import torch.distributed as dist

from cascadelab.platform.bench.train import bare_loop_rate
from cascadelab.platform.config import PARQUET_READERS, load_config
from cascadelab.platform.data.ingest import ArrowToTorch, day_files, pick_reader, read_day
from cascadelab.platform.data.recflow import peak_rss_mib
from cascadelab.platform.data.schema import DatasetMeta, columns_for, groups_for
from cascadelab.platform.data.synthetic import SyntheticConfig, generate
from cascadelab.platform.runtime import ensure_ray
from cascadelab.platform.train.plan import plan_run

log = logging.getLogger(__name__)


@dataclass
class IngestBenchConfig:
    requests: int = 262144  # rows of the generated benchmark day (~1.3 GB in memory, ~130 MB of Parquet)
    rows_per_file: int = 16384
    batch_size: int = 1024
    sample_num: int = 0  # in-batch negatives per request, built in the collate
    shuffle_buffer: int = 0  # Ray Data local shuffle buffer (rows); 0 = off, as the training default
    workers: tuple[int, ...] = (1, 2)
    cpus_per_worker: float = 0.5  # a 2-core machine must leave CPU to Ray Data's read tasks
    objective: str = "dftopk"
    train_batches: int = 6  # batches timed for the training step's rate (the first one excluded)
    data: str | None = None  # an existing dataset instead of generating one (its first day is read)
    day: str | None = None
    seed: int = 0
    parquet_reader: str = "auto"  # Ray Data's Parquet reader, as data.parquet_reader in training configs


def pyarrow_floor(files: list[str], groups: tuple[str, ...], batch_size: int, sample_num: int, seed: int,
                  vocab: dict[str, int]) -> dict[str, float]:
    """Rows/s of a plain PyArrow read of ``files`` (decode only, then decode + collate to torch)."""
    cols = columns_for(groups)
    rows, t0 = 0, time.perf_counter()
    for f in files:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=cols):
            rows += batch.num_rows
    read_s = time.perf_counter() - t0
    collate = ArrowToTorch(groups, sample_num, seed=seed, vocab=vocab, source="bench")
    rows, t0 = 0, time.perf_counter()
    for f in files:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=cols):
            rows += collate(pa.Table.from_batches([batch]))["items"].shape[0]
    floor_s = time.perf_counter() - t0
    return {"rows": float(rows), "pyarrow_read_rows_per_s": rows / read_s, "pyarrow_floor_rows_per_s": rows / floor_s,
            "peak_rss_mib": peak_rss_mib()}


def _consume_loop(config: dict) -> dict[str, float]:
    """Train worker: consume the shard as a training run would, without training."""
    import ray.train

    ctx = ray.train.get_context()
    collate = ArrowToTorch(tuple(config["groups"]), config["sample_num"], seed=ctx.get_world_rank(),
                           vocab=config["vocab"], source="bench")
    shard = ray.train.get_dataset_shard("train")
    rows, t_start = 0, time.perf_counter()
    first = None
    for tensors in shard.iter_torch_batches(batch_size=config["batch_size"], collate_fn=collate,
                                            local_shuffle_buffer_size=config["shuffle_buffer"] or None):
        if first is None:
            first = time.perf_counter()
            first_rows = tensors["items"].shape[0]
        rows += tensors["items"].shape[0]
    end = time.perf_counter()
    steady = max(end - (first or end), 1e-9)
    out = {"rows": float(rows), "rows_per_s": (rows - first_rows) / steady if first else 0.0,
           "rows_per_s_end_to_end": rows / max(end - t_start, 1e-9),
           "first_batch_s": (first or end) - t_start, "peak_rss_mib": peak_rss_mib()}
    gathered = [out]
    if dist.is_available() and dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, out)
    ray.train.report({"rows": out["rows"]})
    return {"workers": gathered}


def _ray_rss_sampler(stop: threading.Event, peak: list[float]) -> None:
    while not stop.is_set():
        total = 0.0
        for p in psutil.process_iter(["cmdline"]):
            try:
                cmd = " ".join(p.info["cmdline"] or [])
                if "default_worker.py" in cmd or cmd.startswith("ray::"):
                    total += p.memory_full_info().pss  # shared object-store pages counted once overall
            except (psutil.Error, TypeError, AttributeError):
                continue
        peak[0] = max(peak[0], total / 2**20)
        stop.wait(0.25)


def ray_data_rates(files: list[str], root: str, day: str, meta: DatasetMeta, groups: tuple[str, ...],
                   cfg: IngestBenchConfig, workers: int, storage: str) -> dict:
    """Per-worker rows/s of the Ray Data pipeline feeding ``workers`` Train workers."""
    from ray.data import ExecutionOptions
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ds = read_day(root, day, meta, groups, files=files, reader=cfg.parquet_reader)
    trainer = TorchTrainer(
        _consume_loop,
        train_loop_config={"groups": list(groups), "sample_num": cfg.sample_num, "vocab": meta.vocab,
                           "batch_size": cfg.batch_size, "shuffle_buffer": cfg.shuffle_buffer},
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": cfg.cpus_per_worker}),
        datasets={"train": ds},
        dataset_config=DataConfig(execution_options={"train": ExecutionOptions(preserve_order=True)}),
        run_config=RunConfig(name=f"ingest-{workers}-{int(time.time() * 1000)}", storage_path=storage),
    )
    stop, peak = threading.Event(), [0.0]
    sampler = threading.Thread(target=_ray_rss_sampler, args=(stop, peak), daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
    finally:
        stop.set()
        sampler.join()
    wall = time.perf_counter() - t0
    per = result.return_value["workers"]  # every rank's numbers, gathered by rank 0
    rates = [m["rows_per_s"] for m in per]
    return {"workers": workers, "rows_per_s_per_worker": rates, "min_rows_per_s_per_worker": min(rates),
            "rows_per_s_per_worker_end_to_end": [m["rows_per_s_end_to_end"] for m in per],
            "total_rows_per_s": sum(rates), "rows": sum(m["rows"] for m in per),
            "first_batch_s": max(m["first_batch_s"] for m in per),
            "train_worker_peak_rss_mib": max(m["peak_rss_mib"] for m in per),
            "ray_processes_peak_rss_mib": peak[0], "wall_s": wall}


def run_ingest_bench(cfg: IngestBenchConfig, out_dir: Path) -> dict:
    import ray

    if cfg.parquet_reader not in PARQUET_READERS:
        raise ValueError(f"parquet_reader: expected one of {', '.join(PARQUET_READERS)}, got {cfg.parquet_reader!r}")
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        root = cfg.data
        if root is None:
            root = str(Path(tmp) / "data")
            t0 = time.perf_counter()
            generate(SyntheticConfig(days=1, requests_per_day=cfg.requests, rows_per_file=cfg.rows_per_file,
                                     seed=cfg.seed), root)
            log.info("generated %d requests in %.1f s", cfg.requests, time.perf_counter() - t0)
        meta = DatasetMeta.read(root)
        day = cfg.day or meta.days[0]
        groups = groups_for("two_stage")
        files = day_files(root, day, meta.mode, groups)
        size_mib = sum(Path(f).stat().st_size for f in files) / 2**20
        ensure_ray()
        fresh = ray.remote(num_cpus=1, max_calls=1)  # a new process per task: its peak RSS is its own
        floor = ray.get(fresh(pyarrow_floor).remote(files, groups, cfg.batch_size, cfg.sample_num, cfg.seed,
                                                    meta.vocab))
        plan = plan_run(load_config(None, {  # the training step's rate on this day: trained and held out
            "data": {"path": root, "batch_size": cfg.batch_size, "train_days": [day], "eval_day": day},
            "objective": {"name": cfg.objective}, "train": {"cpus_per_worker": cfg.cpus_per_worker}}))
        threads = plan.torch_threads
        step = ray.get(ray.remote(num_cpus=cfg.cpus_per_worker, max_calls=1)(bare_loop_rate).remote(
            plan, [day], cfg.train_batches))
        result: dict = {"config": asdict(cfg), "files": len(files), "data_mib": size_mib, "day": day,
                        "parquet_reader": pick_reader(files, cfg.parquet_reader),
                        "torch_threads": threads, "pyarrow": floor, "train_step": step}
        ratios: dict[str, float] = {"pyarrow_floor_rows_per_s": floor["pyarrow_floor_rows_per_s"],
                                    "train_step_rows_per_s": step["samples_per_s"]}
        for w in cfg.workers:
            r = ray_data_rates(files, root, day, meta, groups, cfg, w, str(Path(tmp) / "results"))
            result[f"ray_data_{w}_workers"] = r
            ratios[f"ingest_rows_per_s_per_worker_{w}_workers"] = r["min_rows_per_s_per_worker"]
            ratios[f"ingest_rows_per_s_per_worker_end_to_end_{w}_workers"] = min(r["rows_per_s_per_worker_end_to_end"])
            ratios[f"ingest_over_train_step_{w}_workers"] = r["min_rows_per_s_per_worker"] / step["samples_per_s"]
            ratios[f"ingest_over_pyarrow_floor_{w}_workers"] = (r["min_rows_per_s_per_worker"]
                                                                / floor["pyarrow_floor_rows_per_s"])
            ratios[f"peak_rss_mib_ray_processes_{w}_workers"] = r["ray_processes_peak_rss_mib"]
        ratios["peak_rss_mib_pyarrow_floor"] = floor["peak_rss_mib"]
        result["ratios"] = ratios
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ingest.json").write_text(json.dumps(result, indent=2))
    _plot(result, cfg, out_dir / "ingest.png")
    return result


def _plot(result: dict, cfg: IngestBenchConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["pyarrow read", "pyarrow + collate\n(floor)", "train step"]
    values = [result["pyarrow"]["pyarrow_read_rows_per_s"], result["pyarrow"]["pyarrow_floor_rows_per_s"],
              result["train_step"]["samples_per_s"]]
    for w in cfg.workers:
        names.append(f"Ray Data\n{w} worker(s), per worker")
        values.append(result[f"ray_data_{w}_workers"]["min_rows_per_s_per_worker"])
    fig, ax = plt.subplots(figsize=(8, 3.8))
    ax.bar(names, values, color=["#bbb", "#888", "#d62728"] + ["#1f77b4"] * len(cfg.workers))
    ax.set_yscale("log")
    ax.set_ylabel("rows/s")
    ax.set_title("ingest vs floor vs training step")
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
