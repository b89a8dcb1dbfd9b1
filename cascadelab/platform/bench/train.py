"""Platform overhead of training: the full Ray Data + Ray Train path against a bare in-memory loop.

Both sides train the same cascade (same model, objective, batch size, torch threads, CPU reservation) on
the same rows. The bare loop gets every batch pre-collated in memory (the floor: no I/O, no Ray Data, no
Ray Train; it runs as one Ray task so that its process environment matches a Train worker's); the Ray path reads
Parquet through Ray Data into a Ray Train worker. Reported: steady-state samples/s of each (the Ray
figure excludes each day's pipeline start-up, reported separately as end-to-end throughput), their
ratio, and the 2-worker scaling efficiency = rate(2 workers) / (2 x rate(1 worker)).

Fixed cost (:func:`fixed_costs`, from the 1-worker run's timeline, on a Ray cluster already running):
the time from ``run_training``'s start to the first training step, split into the driver's work before
``fit()`` (plan, MLflow run; then the progress queue and planning the datasets), Ray Train's start
(controller, worker group, dataset iterators: up to the worker function's first line),
the trainer's set-up (model, DDP wrap, checkpoint restore) and the wait for the first batch; the gap at
each day boundary (from a day's last step to the next day's first: the day's report and checkpoint and
the next batch); and end-to-end samples/s (rows over ``fit()``'s wall time) over the steady state.

Roofline: the cascade's FLOPs and bytes per training sample (:func:`roofline.cascade_cost`), this
process's peak FLOP/s and copy bandwidth at the run's torch threads (:func:`roofline.measure_peaks`,
measured in the floor's process), the roofline ``min(F / flops, W / bytes)`` and the fraction of it that
each side reaches, per core (samples/s divided by the torch threads of a worker).
ray and matplotlib are imported lazily (inside functions).
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.parquet as pq
import torch

from cascadelab.cascade.batch import CascadeBatch
from cascadelab.platform.bench.roofline import cascade_cost, measure_peaks, roofline_samples_per_s
from cascadelab.platform.config import load_config, unflatten
from cascadelab.platform.data.ingest import arrow_to_tensors
from cascadelab.platform.data.schema import day_files
from cascadelab.platform.data.synthetic import SyntheticConfig, generate
from cascadelab.platform.runtime import ensure_ray
from cascadelab.platform.train.plan import RunPlan, plan_run
from cascadelab.platform.train.run import run_training

log = logging.getLogger(__name__)


@dataclass
class TrainBenchConfig:
    requests_per_day: int = 4096
    days: int = 4  # the last day is the evaluation day (the demo's shape: 4 days x 4096, batch 512)
    batch_size: int = 512
    objective: str = "dftopk"
    two_workers: bool = True
    data: str | None = None  # an existing dataset instead of generating one
    tracking_uri: str | None = None
    seed: int = 0
    use_gpu: bool = False  # train on the GPU (train.use_gpu=true) on both sides


def bare_loop_rate(plan: RunPlan, days: list[str], max_batches: int | None = None) -> dict[str, float]:
    """Samples/s of a single-process loop over pre-collated in-memory batches of ``days`` (first step
    excluded), with the plan's cascade, batch size, seed and torch threads; ``max_batches``: stop after
    that many batches."""
    cfg = plan.config
    batches = []
    for day in days:
        table = pq.read_table(day_files(cfg.data.path, day, plan.meta.mode, plan.groups))
        for start in range(0, table.num_rows, cfg.data.batch_size):
            batches.append(CascadeBatch.from_dict(arrow_to_tensors(table.slice(start, cfg.data.batch_size),
                                                                   plan.groups)))
            if max_batches is not None and len(batches) >= max_batches:
                break
        if max_batches is not None and len(batches) >= max_batches:
            break
    torch.set_num_threads(plan.torch_threads)
    torch.manual_seed(cfg.train.seed)
    device = torch.device("cuda" if cfg.train.use_gpu == "true" else "cpu")
    peaks = measure_peaks() if device.type == "cpu" else {}
    model = plan.build_cascade().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    times, rows = [], 0
    for i, batch in enumerate(batches):
        batch = batch.to(device)
        t0 = time.perf_counter()
        _, out = model(batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i > 0:  # the first step pays one-off allocation costs
            times.append(time.perf_counter() - t0)
            rows += batch.size
    return {"samples_per_s": rows / sum(times), "step_ms_median": 1000 * statistics.median(times),
            "steps": float(len(times)), **peaks}


RAY_KEYS = ("samples_per_s", "train_rows", "wall_time_s")


def run_train_bench(cfg: TrainBenchConfig, out_dir: Path) -> dict:
    import ray

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        data = cfg.data
        if data is None:
            data = str(Path(tmp) / "data")
            generate(SyntheticConfig(days=cfg.days, requests_per_day=cfg.requests_per_day, seed=cfg.seed), data)
        uri = cfg.tracking_uri or f"sqlite:///{Path(tmp) / 'bench.db'}"

        def config(**extra):
            return load_config(None, unflatten({
                "data.path": data, "data.batch_size": cfg.batch_size, "objective.name": cfg.objective,
                "tracking.uri": uri, "tracking.experiment": "cascadelab-bench-train",
                "train.storage_path": str(Path(tmp) / "results"),
                "train.use_gpu": "true" if cfg.use_gpu else "false", **extra}))

        base = config()
        plan = plan_run(base)
        ensure_ray()
        # the floor runs in a Ray task with the Train worker's CPU reservation and threads (same process
        # environment, e.g. OMP_NUM_THREADS), minus Ray Data and Ray Train
        bare = ray.get(ray.remote(num_cpus=base.train.cpus_per_worker, num_gpus=int(cfg.use_gpu))(
            bare_loop_rate).remote(plan, list(plan.train_days)))
        one = run_training(base)
        result = {"config": asdict(cfg), "threads": plan.torch_threads, "torch": torch.__version__, "bare": bare,
                  "ray_1_worker": {k: one.metrics[k] for k in RAY_KEYS}}
        result["ray_1_worker"]["end_to_end_samples_per_s"] = one.metrics["train_rows"] / one.metrics["wall_time_s"]
        result["fixed_cost"] = fixed_costs(one.timeline)
        ratios = {"overhead_ratio_1_worker": one.metrics["samples_per_s"] / bare["samples_per_s"],
                  "end_to_end_over_steady_1_worker": (result["ray_1_worker"]["end_to_end_samples_per_s"]
                                                      / one.metrics["samples_per_s"]),
                  **{k: v for k, v in result["fixed_cost"].items() if not isinstance(v, list)}}
        if cfg.two_workers:
            two = run_training(config(**{"train.num_workers": 2, "train.cpus_per_worker": 0.5}))
            result["ray_2_workers"] = {k: two.metrics[k] for k in RAY_KEYS}
            ratios["scaling_efficiency_2_workers"] = two.metrics["samples_per_s"] / (2 * one.metrics["samples_per_s"])
        result["ratios"] = ratios
        result["roofline"] = roofline(base, plan, bare, one.metrics["samples_per_s"])
    (out_dir / "train.json").write_text(json.dumps(result, indent=2))
    _plot(result, out_dir / "train.png")
    return result


def fixed_costs(timeline: dict) -> dict:
    """Seconds of a run's fixed costs from its :attr:`TrainResult.timeline` (wall-clock marks): to the
    first step and its parts, each day boundary (``day_boundary_s[d]``: day d's last step to day d+1's
    first), its largest, and from the last step to ``fit()``'s end, split into the last day's report
    and checkpoint, the final evaluation, its report, and Ray Train's shutdown."""
    first = {int(d): t for d, t in timeline["day_first_step"].items()}
    last = {int(d): t for d, t in timeline["day_last_step"].items()}
    days = sorted(first)
    gaps = [first[d + 1] - last[d] for d in days[:-1]]
    return {"time_to_first_step_s": first[days[0]] - timeline["start"],
            "before_fit_s": timeline["fit_start"] - timeline["start"],
            "datasets_planned_s": timeline["fit_call"] - timeline["fit_start"],
            "worker_group_start_s": timeline["worker_start"] - timeline["fit_call"],
            "trainer_setup_s": timeline["ready"] - timeline["worker_start"],
            "first_batch_wait_s": first[days[0]] - timeline["ready"],
            "day_boundary_s": gaps, "day_boundary_max_s": max(gaps, default=0.0),
            "after_last_step_s": timeline["fit_end"] - last[days[-1]],
            "last_report_s": timeline["final_eval_start"] - last[days[-1]],
            "final_eval_s": timeline["final_eval_end"] - timeline["final_eval_start"],
            "final_report_s": timeline["returned"] - timeline["final_eval_end"],
            "shutdown_s": timeline["fit_end"] - timeline["returned"]}


def roofline(cfg, plan: RunPlan, bare: dict[str, float], ray_rate: float) -> dict[str, float]:
    """FLOPs and bytes per sample, samples/s per core of each side and the fraction of the roofline
    (CPU only: the peaks are measured in the floor's process)."""
    cost = cascade_cost(cfg, vocab=plan.meta.vocab, batch_size=cfg.data.batch_size)
    out = {k: cost[k] for k in ("flops_per_sample", "bytes_per_sample", "intensity")}
    out["bare_samples_per_s_per_core"] = bare["samples_per_s"] / plan.torch_threads
    out["ray_samples_per_s_per_core"] = ray_rate / plan.torch_threads
    if "peak_flops" in bare:
        out["peak_flops_per_core"] = bare["peak_flops"] / plan.torch_threads
        out["bandwidth_per_core"] = bare["bandwidth"] / plan.torch_threads
        out["roofline_samples_per_s_per_core"] = roofline_samples_per_s(
            cost, out["peak_flops_per_core"], out["bandwidth_per_core"])
        for side in ("bare", "ray"):
            out[f"{side}_roofline_fraction"] = (out[f"{side}_samples_per_s_per_core"]
                                                / out["roofline_samples_per_s_per_core"])
    return out


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["bare loop"] + [k.replace("_", " ") for k in ("ray_1_worker", "ray_2_workers") if k in result]
    values = [result["bare"]["samples_per_s"]] + [result[k]["samples_per_s"]
                                                  for k in ("ray_1_worker", "ray_2_workers") if k in result]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(names, values, color=["#888", "#1f77b4", "#2ca02c"][: len(values)])
    ax.set_ylabel("training samples/s (steady state)")
    ax.set_title(f"platform overhead ratio {result['ratios']['overhead_ratio_1_worker']:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
