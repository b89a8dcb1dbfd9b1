"""Objective benchmark: one training step of a DSSM -> DIN cascade per objective as the candidate list grows.

Protocol, per N in ``n_values`` (candidates per request):

* one synthetic batch of ``batch`` requests with the RecFlow two-stage layout (4 groups x 10 slots,
  a 50-item behaviour sequence) grown to N candidates by :func:`sample_in_batch_negatives`
  (``sample_num = N - 40``), built once, outside the timed region (DFTopK's ``--sample_num``);
* per objective a fresh ``Cascade(["dssm", "din"], [30, 20])`` (same seed, so the same weights; the
  paper's emb 8 / hidden 128), the objective with the ``ObjectiveConfig`` defaults, and Adam;
* one step = forward of both stage models, the objective, backward, ``Adam.step``; timed with
  ``time.perf_counter`` (CPU) or CUDA events. ``warmup`` untimed steps, then ``steps`` timed steps.
  Objectives are interleaved round-robin (step 1 of every objective, then step 2, ...) so that load
  changes on a shared machine hit all of them alike; the median ms per step is reported.
* ``model-only`` (the same step with ``loss = mean(scores)``) is timed beside them: step minus
  model-only is what the objective itself costs.
* ratios: objective / bce per N (target: dftopk at N = 1040 within 1.3x of bce).

Skips (recorded as ``"skipped: <reason>"``): objectives that build B x N x N tensors when
``B * N * N * 4`` bytes exceeds ``max_quadratic_bytes``; LCRON-DiffSort when its odd-even network's
``B * N^3`` element-operations exceed ``max_sort_work``. A case whose first warm-up step takes longer
than ``max_step_seconds`` is timed on that one step only (``"steps": 1`` in the JSON).

Deviations from the paper's protocol, so that the default run fits a small CPU host:

* batch 32, not 1024. The DIN target attention holds B x N x L x 80 floats: 17 GB at B = 1024,
  N = 1040, L = 50 (more than a CPU host's memory). The model and every
  objective are linear in B, so the objective / bce ratios hardly depend on it. 32 is about the
  smallest batch whose other requests hold the 1000 foreign candidates N = 1040 needs (31 x 40).
* behaviour sequence of 10, not 50 (``seq_len``): the attention over it dominates the step and is
  linear in L. A cheaper model makes every objective's overhead a larger share of the step, so the
  ratios to bce are conservative (upper bounds of the paper-model ratios). ``--set seq_len=50`` and
  ``--set batch=1024`` run the paper's model and batch where time and memory allow.

matplotlib is imported lazily (inside the plotting function).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cascadelab.cascade.batch import CascadeBatch
from cascadelab.cascade.cascade import Cascade
from cascadelab.cascade.negatives import sample_in_batch_negatives
from cascadelab.cascade.objectives import OBJECTIVES
from cascadelab.platform.config import ObjectiveConfig

DEFAULT_OBJECTIVES = ("bce", "icc", "rankflow", "fs-ranknet", "fs-lambdaloss", "arf", "arf-v2", "lcron",
                      "lcron-softsort", "lcron-diffsort", "dftopk", "lapsum", "sparse-topk")
MODEL_ONLY = "model-only"
QUADRATIC = {"icc", "fs-ranknet", "fs-lambdaloss", "arf", "arf-v2", "lcron", "lcron-neuralsort",
             "lcron-softsort", "lcron-diffsort"}
# Synthetic vocabulary of the bench batch (RecFlow-like orders of magnitude for the id tables).
VOCAB = {"user_id": 40000, "device_id": 40000, "age": 8, "gender": 3, "province": 34, "video_id": 100000,
         "author_id": 30000, "category_level_two": 200, "category_level_one": 40, "upload_type": 10}
_ITEM_HIGH = ("video_id", "author_id", "category_level_two", "category_level_one", "upload_type")


@dataclass
class ObjectiveBenchConfig:
    """What to time; the defaults fit a CPU host (see the module docstring)."""

    objectives: tuple[str, ...] = DEFAULT_OBJECTIVES
    n_values: tuple[int, ...] = (40, 200, 1040)
    batch: int = 32  # see the module docstring: 1024 does not fit a CPU host at N = 1040
    warmup: int = 2
    steps: int = 5
    device: str = "cpu"
    threads: int = 0  # torch intra-op threads for the run; 0 = leave torch's setting (all cores)
    emb_dim: int = 8
    hidden: int = 128
    seq_len: int = 10  # behaviour sequence length (the paper's 50: see the module docstring)
    pad_prob: float = 0.05  # share of padded slots among the 40 logged candidates
    lr: float = 1e-2
    max_quadratic_bytes: int = 1 << 30  # skip O(N^2) objectives when B * N * N * 4 bytes exceeds this
    max_sort_work: float = 2e9  # skip lcron-diffsort when B * N^3 exceeds this
    max_step_seconds: float = 30.0  # a slower first step is reported alone, without more steps
    seed: int = 0
    plot: bool = True


def run_objective_bench(cfg: ObjectiveBenchConfig, out_dir: Path) -> dict:
    """Time every objective at every N; write ``objectives.json`` and ``objectives.png``; return the JSON dict."""
    unknown = set(cfg.objectives) - set(OBJECTIVES)
    if unknown:
        raise ValueError(f"unknown objective(s) {sorted(unknown)}; valid: {sorted(OBJECTIVES)}")
    if min(cfg.n_values) < 40 or cfg.batch < 1 or cfg.steps < 1 or cfg.warmup < 0:
        raise ValueError("n_values must be >= 40 (the logged candidates), batch and steps >= 1, warmup >= 0")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device)
    started, load_start = time.time(), _loadavg()
    names = [MODEL_ONLY, *dict.fromkeys(cfg.objectives)]
    results = []
    threads = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        for n in cfg.n_values:
            results.extend(_run_n(cfg, names, n, device))
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    report = {
        "meta": {
            "device": _device_name(device),
            "torch": torch.__version__,
            "threads": used_threads,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "loadavg_start": load_start,
            "loadavg_end": _loadavg(),
            "seconds": round(time.time() - started, 1),
            "config": asdict(cfg),
            "protocol": "DSSM -> DIN cascade, ks [30, 20]; one step = forward + objective + backward + Adam "
                        "step; N grown by in-batch negatives outside the timed region; round-robin over "
                        "objectives; median ms per step",
        },
        "results": results,
        "ratios": _ratios(results, cfg),
    }
    (out_dir / "objectives.json").write_text(json.dumps(report, indent=2))
    if cfg.plot:
        _plot(results, cfg, used_threads, out_dir / "objectives.png")
    return report


def make_batch(cfg: ObjectiveBenchConfig, n: int, device: torch.device) -> CascadeBatch:
    """The synthetic 40-slot batch, grown to ``n`` candidates per request by in-batch negatives."""
    g = torch.Generator().manual_seed(cfg.seed)
    b, slots = cfg.batch, 40

    def ids(high: int, *shape: int) -> torch.Tensor:
        return torch.randint(1, high + 1, shape, generator=g)

    user = torch.stack([ids(VOCAB[f], b) for f in ("user_id", "device_id", "age", "gender", "province")]
                       + [ids(h, b) for h in (7, 24, 60)], dim=1)
    item_cols = [ids(VOCAB[f], b, slots) for f in _ITEM_HIGH] + [ids(h, b, slots) for h in (7, 24, 60)]
    items = torch.stack(item_cols, dim=-1)
    seq = torch.stack([ids(VOCAB[f], b, cfg.seq_len) for f in _ITEM_HIGH], dim=-1)
    seq_mask = torch.rand(b, cfg.seq_len, generator=g) > 0.2
    mask = torch.rand(b, slots, generator=g) >= cfg.pad_prob
    mask[:, 0] = True
    grade = torch.tensor([29.0 - i for i in range(10)] + [7.0] * 10 + [6.0] * 10 + [5.0] * 10)
    batch = CascadeBatch(user=user, seq=seq * seq_mask.unsqueeze(-1), seq_mask=seq_mask,
                         items=items * mask.unsqueeze(-1), mask=mask, label=grade.expand(b, slots) * mask)
    batch = sample_in_batch_negatives(batch, n - slots, g)
    return batch.to(device)


def _skip_reason(cfg: ObjectiveBenchConfig, name: str, n: int) -> str | None:
    b = cfg.batch
    if name in QUADRATIC and b * n * n * 4 > cfg.max_quadratic_bytes:
        return (f"O(N^2) memory: B*N*N*4 bytes = {b * n * n * 4 / 2**30:.2f} GiB > "
                f"{cfg.max_quadratic_bytes / 2**30:.2f} GiB")
    if name == "lcron-diffsort" and b * n**3 > cfg.max_sort_work:
        return f"odd-even network: B*N^3 = {b * n**3:.2e} element-ops > {cfg.max_sort_work:.0e}"
    return None


def _make_step(cfg: ObjectiveBenchConfig, name: str, batch: CascadeBatch, device: torch.device):
    torch.manual_seed(cfg.seed)
    params = dataclasses.asdict(ObjectiveConfig())
    cascade = Cascade(["dssm", "din"], [30, 20], VOCAB, "bce" if name == MODEL_ONLY else name, params,
                      emb_dim=cfg.emb_dim, hidden=cfg.hidden).to(device)
    cascade.train()
    opt = torch.optim.Adam(cascade.parameters(), lr=cfg.lr)

    def step() -> None:
        scores = cascade.scores(batch)
        if name == MODEL_ONLY:
            loss = sum(s.mean() for s in scores)
        else:
            loss = cascade.objective(scores, batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _run_n(cfg: ObjectiveBenchConfig, names: list[str], n: int, device: torch.device) -> list[dict]:
    batch = make_batch(cfg, n, device)
    rows: dict[str, dict] = {}
    steps: dict[str, object] = {}
    for name in names:
        rows[name] = {"objective": name, "n": n, "batch": cfg.batch}
        reason = _skip_reason(cfg, name, n)
        if reason:
            rows[name]["status"] = f"skipped: {reason}"
        else:
            steps[name] = _make_step(cfg, name, batch, device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(cfg.warmup + cfg.steps):
        for name, step in list(steps.items()):
            ms = _time(step, device)
            if i == 0 and ms > cfg.max_step_seconds * 1e3:  # too slow: keep this one step only
                times[name] = [ms]
                rows[name]["note"] = f"first step {ms / 1e3:.1f} s > max_step_seconds: timed once"
                del steps[name]
            elif i >= cfg.warmup:
                times[name].append(ms)
    for name, ts in times.items():
        rows[name].update({"status": "ok", "median_ms": statistics.median(ts), "mean_ms": statistics.fmean(ts),
                           "min_ms": min(ts), "steps": len(ts)})
    del steps, batch
    return list(rows.values())


def _time(step, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    step()
    return (time.perf_counter() - t0) * 1e3


def _find(results: list[dict], name: str, n: int) -> float | None:
    for r in results:
        if r["objective"] == name and r["n"] == n and r["status"] == "ok":
            return r["median_ms"]
    return None


def _ratios(results: list[dict], cfg: ObjectiveBenchConfig) -> dict:
    """``<objective>_over_bce_n<N>`` for every timed objective and N (None where not run), plus the target."""
    out: dict[str, float | None | bool] = {}
    for n in cfg.n_values:
        bce = _find(results, "bce", n)
        for name in [MODEL_ONLY, *cfg.objectives]:
            if name == "bce":
                continue
            ms = _find(results, name, n)
            out[f"{name}_over_bce_n{n}"] = None if ms is None or not bce else ms / bce
    n_max = max(cfg.n_values)
    target = out.get(f"dftopk_over_bce_n{n_max}")
    out[f"dftopk_within_1.3x_bce_n{n_max}"] = None if target is None else bool(target <= 1.3)
    return out


def _plot(results: list[dict], cfg: ObjectiveBenchConfig, threads: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = plt.get_cmap("tab20").colors
    for i, name in enumerate([MODEL_ONLY, *cfg.objectives]):
        pts = [(r["n"], r["median_ms"]) for r in results if r["objective"] == name and r["status"] == "ok"]
        if not pts:
            continue
        style = dict(marker="o", linestyle="--" if name == MODEL_ONLY else "-", label=name,
                     color=colors[i % len(colors)])
        axes[0].plot(*zip(*sorted(pts), strict=True), **style)
        rel = [(n, ms / b) for n, ms in pts if (b := _find(results, "bce", n))]
        if rel:
            axes[1].plot(*zip(*sorted(rel), strict=True), **style)
    axes[0].set_ylabel("median ms per training step")
    axes[1].set_ylabel("step time / bce step time")
    axes[1].axhline(1.3, color="grey", linewidth=0.8, linestyle=":")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("N (candidates per request)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    axes[0].set_title(f"DSSM -> DIN step, batch {cfg.batch}, L {cfg.seq_len}, {cfg.device}, {threads} threads")
    axes[1].set_title("ratio to bce (dotted: 1.3)")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


__all__ = ["DEFAULT_OBJECTIVES", "ObjectiveBenchConfig", "make_batch", "run_objective_bench"]
