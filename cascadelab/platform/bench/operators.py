"""Operator micro-benchmark: the DFTopK paper's runtime protocol, extended to large batches and N.

Protocol (zhangzhen97/DFTOPK ``count_time_fin.py``), per
operator, batch size B and list length N (k = N // 2):

* one timed step = forward + loss + backward, no optimizer. Inputs are drawn once and reused (a fresh
  leaf per step); unlike the paper's script, input generation and the toy DSSM are not timed: only the
  operator and its loss are timed. ``warmup`` untimed steps, then ``steps`` timed ones
  (``time.perf_counter`` on CPU; CUDA events + synchronize on CUDA); median and mean ms per step.
* top-k operators: BCE against a random hard top-k label (k random positions per row set to 1).
  floor / dftopk / dftopk-official-style: the soft mask (a sigmoid) and ``F.binary_cross_entropy`` on
  it, the issue's "plain sigmoid + BCE" pipeline. floor-logits / dftopk-logits: the training path
  (``dftopk_logits`` and BCE-with-logits, as the DFTopK paper trains), a cheaper loss and so a stricter
  floor. lapsum and sparse-topk output probabilities in [0, 1] (exact 0 and 1 occur), so they use BCE
  on probabilities clamped to [1e-6, 1 - 1e-6] (the reference fed sparse-topk's probabilities to
  BCE-with-logits; that is not reproduced).
* permutation operators: the label permutation is built with the same operator under ``no_grad`` from
  random graded labels (tau 1e-4 for neuralsort/softsort, steepness 1000 for diffsort, as the
  reference), and the loss is the listwise cross entropy -sum(P_label * log(P + 1e-6)) / n^2.

Baselines timed in the same run:

* ``floor``: ``sigmoid(scores / tau)`` and BCE on it, no threshold: what any top-k mask + BCE must pay
  (the issue's floor; ``floor-logits``: BCE-with-logits on ``scores / tau``, the floor of the logits path).
* ``dftopk-official-style``: the official formula from the math: theta from two ``torch.kthvalue``
  calls, autograd through them.
* ``neuralsort-reference-style``: NeuralSort with ``|s_i - s_j| @ 1 1^T`` (the O(n^3) form).

Headline (``headline_rounds``, default 40): after the grid, every (batch, N) of the grid is timed again
with the operators of each comparison interleaved step by step (floor, dftopk, official, floor-logits,
dftopk-logits; lapsum beside the authors' code), so that drift on a shared machine hits both sides of
each ratio alike. The ``headline_*`` ratios are the ones to read for the targets (:func:`_headline`).

Skips (recorded in the JSON as ``"skipped: <reason>"``): O(n^2)-memory operators when
B * N * N * 4 bytes > ``max_quadratic_bytes`` (2 GiB); and, to keep the default run to a few minutes on
2 cores, O(n^2) operators with B * N^2 > ``max_quadratic_elements`` and cases whose estimated
element-operations (B N^2 L for the sorting network with L layers, B N^3 for the O(n^3) reference)
exceed ``max_work``. Raise those two budgets for a full sweep.
A case whose single step is slow gets fewer steps: ``warmup`` and ``steps`` are cut so that a case
takes about ``max_seconds_per_case`` (at least 1 warm-up and 2 timed steps); the JSON records the
counts actually used.

Memory (dftopk, B = max batch): ``saved_bytes`` = bytes the autograd graph keeps for backward, counted
with ``torch.autograd.graph.saved_tensors_hooks`` (exact, any device), for the operator alone and for
operator + BCE; ``peak_bytes`` = peak extra memory of one forward + BCE + backward step: on CUDA the
growth of ``torch.cuda.max_memory_allocated``, on CPU the peak of the running sum of allocations (charged
to the op that made them) and frees recorded by ``torch.profiler`` with ``profile_memory=True``. Both
are also given per B*N element.

matplotlib is imported lazily, in :func:`_plot`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

from cascadelab.operators import (
    dftopk,
    dftopk_logits,
    diff_sort,
    lapsum_topk,
    neural_sort,
    operator_default,
    soft_sort,
    sparse_topk,
)

ALL_OPERATORS = (
    "floor",
    "dftopk",
    "dftopk-official-style",
    "floor-logits",
    "dftopk-logits",
    "lapsum",
    "sparse-topk",
    "softsort",
    "neuralsort",
    "neuralsort-reference-style",
    "diffsort",
)
QUADRATIC = {"softsort", "neuralsort", "neuralsort-reference-style", "diffsort"}


@dataclass
class OperatorBenchConfig:
    """What to time. The defaults run the paper grid at batch 1 and the extension at batch 1024."""

    sizes: tuple[int, ...] = (5, 10, 50, 100, 500, 1000, 10000)
    batch_sizes: tuple[int, ...] = (1, 1024)
    warmup: int = 10
    steps: int = 50
    operators: tuple[str, ...] = ALL_OPERATORS
    device: str = "cpu"
    dtype: str = "float32"
    tau: float = operator_default("dftopk", "tau")  # dftopk / floor / official
    lapsum_alpha: float = operator_default("lapsum", "alpha")
    sparse_l: float = operator_default("sparse-topk", "l")
    sort_tau: float = operator_default("neuralsort", "tau")  # neuralsort / softsort
    steepness: float = operator_default("diffsort", "steepness")  # diffsort
    max_seconds_per_case: float = 3.0
    max_quadratic_bytes: int = 2 * 2**30
    max_quadratic_elements: float = 5e7  # time budget for the O(n^2) operators (B * N^2)
    max_work: float = 2e8  # time budget for diffsort (B N^2 L) and the O(n^3) reference (B N^3)
    seed: int = 0
    threads: int | None = None  # torch.set_num_threads for the run (None: leave torch's default)
    plot: bool = True
    memory: bool = True
    # CPU on glibc: serve every allocation from the heap and keep freed memory in the process (mallopt
    # M_MMAP_MAX=0, M_TRIM_THRESHOLD=max) for the run, as a caching allocator would. glibc's default maps
    # each block over 32 MiB freshly and page-faults it in on every step, so the large cases would time
    # the kernel's page faults rather than the operators. Restored afterwards; recorded in the JSON meta.
    keep_freed_memory: bool = True
    # After the grid, every case is timed again with the operators of each comparison interleaved step by
    # step, up to this many rounds: drift on a shared machine then hits both sides of a ratio alike (the
    # grid times each case's steps back to back). 0 = skip. See _headline.
    headline_rounds: int = 40
    # A Python file with the LapSum authors' pure-PyTorch ``soft_top_k(r, k, alpha)`` (github.com/gmum/LapSum,
    # tutorial_notebooks/soft_topk.ipynb; not shipped here). When set, it is timed as "lapsum-reference"
    # beside ours, with ``k`` as a per-row float tensor and ``alpha`` as a tensor, as that code expects.
    lapsum_reference: str | None = None
    extra: dict = field(default_factory=dict)  # free-form notes copied into the JSON


def run_operator_bench(cfg: OperatorBenchConfig, out_dir: Path) -> dict:
    """Run the grid, write ``operators.json`` and ``operators.png`` into ``out_dir``, return the JSON dict."""
    unknown = set(cfg.operators) - set(ALL_OPERATORS) - {"lapsum-reference"}
    if unknown:
        raise ValueError(f"unknown benchmark operator(s) {sorted(unknown)}; valid: {list(ALL_OPERATORS)}")
    if cfg.lapsum_reference:
        _load_reference(cfg.lapsum_reference)  # fail before any timing
        if "lapsum-reference" not in cfg.operators:
            cfg = replace(cfg, operators=(*cfg.operators, "lapsum-reference"))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads_before = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    allocator = _keep_freed_memory(True) if cfg.keep_freed_memory and cfg.device == "cpu" else "default"
    try:
        return _run(cfg, out_dir, allocator)
    finally:
        torch.set_num_threads(threads_before)
        if allocator != "default":
            _keep_freed_memory(False)


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc malloc.h


def _keep_freed_memory(on: bool) -> str:
    """Switch glibc malloc to heap-only, never-trimmed allocation (``on``) or back to its defaults.

    Returns a description of the allocator for the JSON, or "default" where this is not glibc.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "default"
    if on:
        ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
        return "glibc: heap only, freed memory kept (mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1)" if ok \
            else "default"
    mallopt(_M_MMAP_MAX, 65536)
    mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
    libc.malloc_trim(0)
    return "default"


def _run(cfg: OperatorBenchConfig, out_dir: Path, allocator: str = "default") -> dict:
    device = torch.device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    started = time.time()
    load_start = _loadavg()
    results = []
    for batch in cfg.batch_sizes:
        for n in cfg.sizes:
            for op in cfg.operators:
                results.append(_run_case(cfg, op, batch, n, device, dtype))
    report = {
        "meta": {
            "device": _device_name(device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "allocator": allocator,
            "dtype": cfg.dtype,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "loadavg_start": load_start,
            "loadavg_end": _loadavg(),
            "seconds": round(time.time() - started, 1),
            "config": asdict(cfg),
            "protocol": "forward + loss + backward per step, no optimizer; k = N // 2; see module docstring",
        },
        "results": results,
        "ratios": _ratios(results, cfg),
        "ratios_from_min": _ratios(results, cfg, "min_ms"),
    }
    if cfg.headline_rounds > 0:
        report["headline"] = _headline(cfg, device, dtype)
        report["ratios"].update({f"headline_{key}": value for key, value in report["headline"].items()
                                 if isinstance(value, float)})
    if cfg.memory and "dftopk" in cfg.operators:
        report["memory"] = _dftopk_memory(cfg, device, dtype)
    (out_dir / "operators.json").write_text(json.dumps(report, indent=2))
    if cfg.plot:
        _plot(results, cfg, out_dir / "operators.png")
    return report


# --------------------------------------------------------------------------------------------------
# one case


def _run_case(cfg: OperatorBenchConfig, op: str, batch: int, n: int, device, dtype) -> dict:
    row = {"operator": op, "batch": batch, "n": n, "k": max(1, n // 2)}
    reason = _skip_reason(cfg, op, batch, n, dtype)
    if reason:
        return {**row, "status": f"skipped: {reason}"}
    started = time.perf_counter()
    step = _make_step(cfg, op, batch, n, device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # one probe step sizes the warm-up and the timed steps to the time budget
    t0 = time.perf_counter()
    step()
    sync()
    probe = time.perf_counter() - t0
    per_case = max(cfg.max_seconds_per_case, 0.0)
    budget_steps = int(per_case / max(probe, 1e-6))
    warmup = max(0, min(cfg.warmup, budget_steps // 5) - 1)
    steps = max(2, min(cfg.steps, budget_steps - warmup))
    for _ in range(warmup):
        step()
    times = _time_steps(step, steps, device)
    return {
        **row,
        "status": "ok",
        "median_ms": statistics.median(times),
        "mean_ms": statistics.fmean(times),
        "min_ms": min(times),
        "warmup": warmup + 1,
        "steps": steps,
        "case_seconds": round(time.perf_counter() - started, 2),
    }


def _time_steps(step: Callable[[], None], steps: int, device) -> list[float]:
    times = []
    if device.type == "cuda":
        for _ in range(steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def _skip_reason(cfg: OperatorBenchConfig, op: str, batch: int, n: int, dtype) -> str | None:
    elem = torch.empty((), dtype=dtype).element_size()
    if op in QUADRATIC and batch * n * n * elem > cfg.max_quadratic_bytes:
        return f"O(n^2) memory: B*N*N*{elem} bytes = {batch * n * n * elem / 2**30:.1f} GiB > " \
               f"{cfg.max_quadratic_bytes / 2**30:.1f} GiB"
    if op in QUADRATIC and batch * n * n > cfg.max_quadratic_elements:
        return f"time budget: B*N^2 = {batch * n * n:.2e} > {cfg.max_quadratic_elements:.0e}"
    if op == "diffsort" and batch * n * n * n > cfg.max_work:
        return f"odd-even network: B*N^2*L = {batch * n**3:.2e} element-ops > {cfg.max_work:.0e}"
    if op == "neuralsort-reference-style" and batch * n**3 > cfg.max_work:
        return f"O(n^3) matmul: B*N^3 = {batch * n**3:.2e} > {cfg.max_work:.0e}"
    return None


def _make_step(cfg: OperatorBenchConfig, op: str, batch: int, n: int, device, dtype) -> Callable[[], None]:
    """One timed step of ``op`` at (batch, n): a fresh leaf, the operator, its loss and the backward."""
    g = torch.Generator().manual_seed(cfg.seed + 7919 * n + batch)
    k = max(1, n // 2)
    scores = torch.randn(batch, n, generator=g).to(device=device, dtype=dtype)
    label = torch.zeros(batch, n)  # random hard top-k label: k random positions per row
    label.scatter_(1, torch.rand(batch, n, generator=g).argsort(1)[:, :k], 1.0)
    label = label.to(device=device, dtype=dtype)
    grades = torch.randn(batch, n, generator=g).to(device=device, dtype=dtype)
    kind, fn, label_fn = _operator_fns(cfg, op, batch, k, device, dtype)

    def step() -> None:
        x = scores.detach().requires_grad_()
        if kind == "perm":
            with torch.no_grad():
                target = label_fn(grades)
            loss = -(target * torch.log(fn(x) + _EPS)).sum() / (batch * n * n)
        elif kind == "logits":
            loss = F.binary_cross_entropy_with_logits(fn(x), label)
        else:  # probabilities; "clamp" where exact 0 and 1 occur
            out = fn(x)
            loss = F.binary_cross_entropy(out.clamp(_EPS, 1 - _EPS) if kind == "clamp" else out, label)
        loss.backward()

    return step


_EPS = 1e-6


def _operator_fns(cfg: OperatorBenchConfig, op: str, batch: int, k: int, device, dtype) -> tuple:
    """(loss kind, operator on the scores, label operator or None) of benchmark operator ``op``."""
    tau = cfg.tau
    topk = {
        "floor": ("probs", lambda x: torch.sigmoid(x / tau)),
        "dftopk": ("probs", lambda x: dftopk(x, k, tau)),
        "dftopk-official-style": ("probs", lambda x: torch.sigmoid(official_dftopk_logits(x, k, tau))),
        "floor-logits": ("logits", lambda x: x / tau),
        "dftopk-logits": ("logits", lambda x: dftopk_logits(x, k, tau)),
        "lapsum": ("clamp", lambda x: lapsum_topk(x, k, cfg.lapsum_alpha)),
        "sparse-topk": ("clamp", lambda x: sparse_topk(x, k, cfg.sparse_l)),
    }
    perm = {
        "neuralsort": (lambda x: neural_sort(x, cfg.sort_tau), lambda y: neural_sort(y, 1e-4)),
        "neuralsort-reference-style": (lambda x: reference_neural_sort(x, cfg.sort_tau),
                                       lambda y: reference_neural_sort(y, 1e-4)),
        "softsort": (lambda x: soft_sort(x, cfg.sort_tau), lambda y: soft_sort(y, 1e-4)),
        "diffsort": (lambda x: diff_sort(x, cfg.steepness), lambda y: diff_sort(y, 1000.0)),
    }
    if op == "lapsum-reference":
        ref = _load_reference(cfg.lapsum_reference)
        k_rows = torch.full((batch,), float(k), device=device, dtype=dtype)
        alpha = torch.tensor(cfg.lapsum_alpha, device=device, dtype=dtype)
        return "clamp", lambda x: ref(x, k_rows, alpha), None
    if op in topk:
        return (*topk[op], None)
    if op in perm:
        return ("perm", *perm[op])
    raise ValueError(f"unknown benchmark operator {op!r}")


# --------------------------------------------------------------------------------------------------
# baselines written from the math (zhangzhen97/DFTOPK, kwai/LCRON ``sorting.py``)


def official_dftopk_logits(x: Tensor, k: int, tau: float) -> Tensor:
    """(x - theta) / tau with theta = midpoint of two ``torch.kthvalue`` calls; autograd through them."""
    n = x.shape[-1]
    kth = torch.kthvalue(x, n - k + 1, dim=-1, keepdim=True).values  # k-th largest
    next_ = torch.kthvalue(x, n - k, dim=-1, keepdim=True).values  # (k+1)-th largest
    return (x - (kth + next_) / 2) / tau


def reference_neural_sort(s: Tensor, tau: float) -> Tensor:
    """NeuralSort as the LCRON code computes it: sum_j |s_i - s_j| through an all-ones n x n matmul."""
    n = s.shape[-1]
    dist = (s.unsqueeze(-1) - s.unsqueeze(-2)).abs()
    b = dist @ torch.ones(n, n, dtype=s.dtype, device=s.device)  # O(n^3)
    scale = (n + 1 - 2 * torch.arange(1, n + 1, dtype=s.dtype, device=s.device)).unsqueeze(-1)
    return torch.softmax((scale * s.unsqueeze(-2) - b.transpose(-1, -2)) / tau, dim=-1)


# --------------------------------------------------------------------------------------------------
# summaries


def _find(results: list[dict], op: str, batch: int, n: int, stat: str = "median_ms") -> float | None:
    for r in results:
        if r["operator"] == op and r["batch"] == batch and r["n"] == n and r["status"] == "ok":
            return r[stat]
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _ratios(results: list[dict], cfg: OperatorBenchConfig, stat: str = "median_ms") -> dict:
    """Ratios of per-step times (``stat``: median_ms, or min_ms which is less sensitive to other load on a
    shared machine); only the ratios whose cases both ran."""
    big = max(cfg.batch_sizes)
    small = min(cfg.batch_sizes)

    def f(op: str, b: int, n: int) -> float | None:
        return _find(results, op, b, n, stat)

    out = {}
    for b in sorted({big, small}):
        out[f"dftopk_over_floor_b{b}_n1000"] = _ratio(f("dftopk", b, 1000), f("floor", b, 1000))
        out[f"official_over_dftopk_b{b}_n1000"] = _ratio(f("dftopk-official-style", b, 1000), f("dftopk", b, 1000))
        out[f"dftopk_n10000_over_n1000_b{b}"] = _ratio(f("dftopk", b, 10000), f("dftopk", b, 1000))
        out[f"floor_n10000_over_n1000_b{b}"] = _ratio(f("floor", b, 10000), f("floor", b, 1000))
        out[f"dftopk_logits_over_floor_logits_b{b}_n1000"] = _ratio(f("dftopk-logits", b, 1000),
                                                                   f("floor-logits", b, 1000))
        out[f"dftopk_logits_n10000_over_n1000_b{b}"] = _ratio(f("dftopk-logits", b, 10000),
                                                             f("dftopk-logits", b, 1000))
    for b in sorted(set(cfg.batch_sizes)):
        for n in cfg.sizes:
            r = _ratio(f("lapsum", b, n), f("lapsum-reference", b, n))
            if r is not None:
                out[f"lapsum_over_reference_b{b}_n{n}"] = r
    ns = [n for n in cfg.sizes if f("neuralsort-reference-style", small, n) and f("neuralsort", small, n)]
    if ns:
        n = max(ns)
        out[f"neuralsort_reference_over_ours_b{small}_n{n}"] = _ratio(f("neuralsort-reference-style", small, n),
                                                                      f("neuralsort", small, n))
    return {key: value for key, value in out.items() if value is not None}


HEADLINE_OPERATORS = ("floor", "dftopk", "dftopk-official-style", "floor-logits", "dftopk-logits")


def _headline(cfg: OperatorBenchConfig, device, dtype) -> dict:
    """The target ratios from interleaved timing: each round runs one step of every operator of a group.

    Groups, at every (batch, N) of the grid: the DFTopK set (``HEADLINE_OPERATORS``, when dftopk is
    benchmarked) and LapSum beside the authors' code (when given). Rounds are cut so that a group takes
    about 2 * ``max_seconds_per_case`` (at least 5).
    """
    big_b, big_n = max(cfg.batch_sizes), max(cfg.sizes)
    cases = [(b, n) for b in cfg.batch_sizes for n in cfg.sizes]
    groups = [(b, n, HEADLINE_OPERATORS) for b, n in cases] if "dftopk" in cfg.operators else []
    if cfg.lapsum_reference and "lapsum" in cfg.operators:
        groups += [(b, n, ("lapsum", "lapsum-reference")) for b, n in cases]
    out: dict = {"rounds_max": cfg.headline_rounds}
    for b, n, ops in groups:
        med, rounds = _interleaved(cfg, ops, b, n, device, dtype)
        key = f"b{b}_n{n}"
        out.setdefault(key, {"rounds": {}})["rounds"][ops[0]] = rounds
        out[key].update({f"{op}_median_ms": t for op, t in med.items()})
        if "dftopk" in med:
            out[f"{key}_dftopk_over_floor"] = med["dftopk"] / med["floor"]
            out[f"{key}_official_over_dftopk"] = med["dftopk-official-style"] / med["dftopk"]
            out[f"{key}_dftopk_logits_over_floor_logits"] = med["dftopk-logits"] / med["floor-logits"]
        else:
            out[f"{key}_lapsum_over_reference"] = med["lapsum"] / med["lapsum-reference"]
    first, last = f"b{big_b}_n1000", f"b{big_b}_n{big_n}"
    if big_n != 1000 and first in out and last in out:
        out[f"b{big_b}_dftopk_n{big_n}_over_n1000"] = out[last]["dftopk_median_ms"] / out[first]["dftopk_median_ms"]
        out[f"b{big_b}_floor_n{big_n}_over_n1000"] = out[last]["floor_median_ms"] / out[first]["floor_median_ms"]
    return out


def _interleaved(cfg: OperatorBenchConfig, ops: tuple[str, ...], batch: int, n: int, device,
                 dtype) -> tuple[dict[str, float], int]:
    steps = {op: _make_step(cfg, op, batch, n, device, dtype) for op in ops}
    first = {op: _time_steps(step, 2, device)[-1] for op, step in steps.items()}  # warm-up + one timing
    rounds = max(5, min(cfg.headline_rounds, int(2 * cfg.max_seconds_per_case * 1e3 / max(sum(first.values()),
                                                                                             1e-3))))
    times: dict[str, list[float]] = {op: [] for op in steps}
    for _ in range(rounds):
        for op, step in steps.items():
            times[op].extend(_time_steps(step, 1, device))
    return {op: statistics.median(t) for op, t in times.items()}, rounds


def _load_reference(path: str | None) -> Callable:
    """``soft_top_k`` from the user's copy of the LapSum authors' code (option ``lapsum_reference``)."""
    if not path or not Path(path).is_file():
        raise ValueError(f"lapsum_reference: '{path}' is not a file (expected a .py file defining soft_top_k)")
    spec = importlib.util.spec_from_file_location("lapsum_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = getattr(module, "soft_top_k", None)
    if not callable(fn):
        raise ValueError(f"lapsum_reference: '{path}' defines no function soft_top_k(r, k, alpha)")
    return fn


def _dftopk_memory(cfg: OperatorBenchConfig, device, dtype) -> dict:
    batch = max(cfg.batch_sizes)
    rows = []
    for n in sorted({min(cfg.sizes), max(cfg.sizes)} | ({1000} & set(cfg.sizes))):
        k = max(1, n // 2)
        g = torch.Generator().manual_seed(cfg.seed)
        scores = torch.randn(batch, n, generator=g).to(device=device, dtype=dtype)
        label = (torch.rand(batch, n, generator=g) < 0.5).to(device=device, dtype=dtype)
        x = scores.detach().requires_grad_()
        op_bytes = _saved_bytes(lambda x=x, k=k: dftopk_logits(x, k, cfg.tau))
        step_bytes = _saved_bytes(
            lambda x=x, k=k, y=label: F.binary_cross_entropy_with_logits(dftopk_logits(x, k, cfg.tau), y))

        def step(x=x, k=k, label=label) -> None:
            xx = x.detach().requires_grad_()
            F.binary_cross_entropy_with_logits(dftopk_logits(xx, k, cfg.tau), label).backward()

        peak = _peak_bytes(step, device)
        elems = batch * n
        rows.append({
            "batch": batch, "n": n,
            "saved_bytes_operator": op_bytes, "saved_bytes_operator_plus_bce": step_bytes,
            "saved_bytes_per_element": step_bytes / elems,
            "peak_bytes": peak, "peak_bytes_per_element": None if peak is None else peak / elems,
        })
    method = ("cuda max_memory_allocated" if device.type == "cuda" else
              "torch.profiler(profile_memory=True): running sum of per-op allocations and frees")
    return {"operator": "dftopk", "saved_bytes_method": "torch.autograd.graph.saved_tensors_hooks",
            "peak_method": method, "rows": rows}


def _saved_bytes(fn: Callable[[], Tensor]) -> int:
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def _peak_bytes(step: Callable[[], None], device) -> int | None:
    """Peak of (allocated - freed) bytes during one step, relative to its start."""
    step()  # warm caches and lazy inits
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # allocations are charged to the op that made them, frees appear as "[memory]" events
    deltas = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.profiler.function_events
                    if e.self_cpu_memory_usage)
    peak = running = 0
    for _, delta in deltas:
        running += delta
        peak = max(peak, running)
    return peak


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _plot(results: list[dict], cfg: OperatorBenchConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = list(cfg.batch_sizes)
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    for ax, batch in zip(axes[0], batches, strict=True):
        for op in cfg.operators:
            pts = [(r["n"], r["median_ms"]) for r in results
                   if r["operator"] == op and r["batch"] == batch and r["status"] == "ok"]
            if pts:
                ax.plot(*zip(*sorted(pts), strict=True), marker="o", label=op)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N (items per list), k = N // 2")
        ax.set_ylabel("median ms per step (fwd + loss + bwd)")
        ax.set_title(f"batch {batch}, {cfg.device}, {cfg.dtype}, {torch.get_num_threads()} threads")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["ALL_OPERATORS", "OperatorBenchConfig", "official_dftopk_logits", "reference_neural_sort",
           "run_operator_bench"]
