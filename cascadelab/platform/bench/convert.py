"""Converter memory and speed: one synthetic RecFlow release day at a realistic per-request size.

The public release is not reachable from CI, so this writes a day in the release layout
(``all_stage/<day>.feather``, the two pickles, ``others/id_cnt.pkl``) with ``candidates`` rows per
request spread over the six stages (RecFlow averages ~200: 1.9B stage samples over 9.3M requests), then
converts it in a fresh process (a Ray task with ``max_calls=1``) whose peak RSS is the converter's own.

Two day sizes are converted; reported per size: peak RSS, the in-memory size of each pickle once loaded,
requests/s. The peak is fitted as a line in the number of requests through the two sizes and
extrapolated to ``full_day_requests`` (RecFlow: 9.3M requests over 37 days, ~250k per day). The
converter holds one pickle plus a few chunks, so the slope should be about the larger pickle's size
per request. ray and matplotlib are imported lazily (inside functions).
"""

from __future__ import annotations

import gc
import json
import logging
import pickle
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import psutil

from cascadelab.platform.data.recflow import convert_recflow, peak_rss_mib
from cascadelab.platform.runtime import ensure_ray

STAGE_SIZES = {"rerank_pos": 6, "rerank_neg": 4, "rank_pos": 10, "rank_neg": 30, "coarse_neg": 60,
               "prerank_neg": 90}


@dataclass
class ConvertBenchConfig:
    requests: tuple[int, ...] = (20000, 60000)  # two day sizes: the peak is fitted as a line through them
    candidates: int = 200  # rows per request over all stages (scaled from STAGE_SIZES)
    full_day_requests: int = 250_000
    memory_limit_gib: float = 4.0
    day: str = "2024-01-13"
    seed: int = 0


def write_release_day(base: Path, day: str, requests: int, candidates: int, seed: int) -> dict[str, int]:
    """A release-layout day of ``requests`` requests (vectorised; columns the converter reads plus ids)."""
    rng = np.random.default_rng(seed)
    for sub in ("all_stage", "seq_effective_50_dict", "request_id_dict", "others"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    scale = candidates / sum(STAGE_SIZES.values())
    sizes = {g: max(1, round(n * scale)) for g, n in STAGE_SIZES.items()}
    per = sum(sizes.values())
    rids = 1_000_000 + np.arange(requests, dtype=np.int64)
    day0 = int(pd.Timestamp(day, tz="Asia/Shanghai").timestamp() * 1000)
    n_vid = 1_000_000
    cand = np.empty((requests, per, 8), np.int64)
    cand[:, :, 0] = rng.integers(0, n_vid, (requests, per))
    cand[:, :, 1] = cand[:, :, 0] % 50_000
    cand[:, :, 2] = rng.integers(1, 300, (requests, per))
    cand[:, :, 3] = cand[:, :, 0] % 700
    cand[:, :, 4] = cand[:, :, 0] % 20
    cand[:, :, 5] = day0 // 1000 - rng.integers(0, 10**7, (requests, per))
    cand[:, :, 6] = cand[:, :, 3] % 40
    cand[:, :, 7] = 0
    bounds = np.cumsum([0, *sizes.values()])
    req_dict = {np.int64(r): {g: cand[i, bounds[j]:bounds[j + 1]].copy() for j, g in enumerate(sizes)}
                for i, r in enumerate(rids.tolist())}
    with open(base / "request_id_dict" / f"{day}.pkl", "wb") as f:
        pickle.dump(req_dict, f, protocol=pickle.HIGHEST_PROTOCOL)
    del req_dict
    seq = np.zeros((requests, 50, 10), np.int64)
    seq[:, :, :5] = rng.integers(0, 1000, (requests, 50, 5))
    seq[:, :, 7] = day0 - rng.integers(1, 10**9, (requests, 50))
    seq[:, :10, 7] = 0  # front padding
    with open(base / "seq_effective_50_dict" / f"{day}.pkl", "wb") as f:
        pickle.dump({int(r): seq[i] for i, r in enumerate(rids.tolist())}, f, protocol=pickle.HIGHEST_PROTOCOL)
    del seq
    flags = {g: np.repeat(np.arange(len(sizes)) == j, list(sizes.values())) for j, g in enumerate(sizes)}
    rows = requests * per
    user = rng.integers(0, 40_000, requests)
    table = {
        "request_id": np.repeat(rids, per), "user_id": np.repeat(user, per),
        "request_timestamp": np.repeat(day0 + rng.integers(0, 86_400_000, requests), per),
        "device_id": np.repeat(user % 30_000, per), "age": np.repeat(user % 8, per),
        "gender": np.repeat(user % 3, per), "province": np.repeat(user % 34, per),
        "video_id": cand[:, :, 0].reshape(-1),
        **{g: np.tile(flags[g], requests).astype(np.int64) for g in sizes},
        "rank_index": np.tile(np.where(flags["rank_pos"], np.cumsum(flags["rank_pos"]), 0), requests),
        "rerank_index": np.tile(np.where(flags["rerank_pos"], np.cumsum(flags["rerank_pos"]), 0), requests),
    }
    del cand
    pd.DataFrame(table).to_feather(base / "all_stage" / f"{day}.feather", chunksize=1 << 20)
    with open(base / "others" / "id_cnt.pkl", "wb") as f:
        pickle.dump({"user_id": 40_000, "device_id": 30_000, "age": 8, "gender": 3, "province": 34,
                     "photo_id": n_vid, "author_id": 50_000, "category_level_two": 700, "category_level_one": 40,
                     "upload_type": 20}, f)
    return {"all_stage_rows": rows, "candidates_per_request": per}


def _pickle_mib(path: Path) -> float:
    """Resident growth from loading one pickle (measured in this process, then freed)."""
    proc = psutil.Process()
    gc.collect()
    before = proc.memory_info().rss
    obj = pickle.loads(path.read_bytes())
    after = proc.memory_info().rss
    del obj
    gc.collect()
    return (after - before) / 2**20


def convert_in_fresh_process(src: str, out: str) -> dict[str, float]:
    """Convert the release at ``src``; returns wall time and this process's peak RSS."""
    logging.basicConfig(level=logging.INFO)
    base = peak_rss_mib()
    t0 = time.perf_counter()
    meta = convert_recflow(src, out)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "requests": float(sum(meta.rows_per_day.values())),
            "peak_rss_mib": peak_rss_mib(),
            "rss_before_mib": base}


def _one_size(cfg: ConvertBenchConfig, requests: int, tmp: Path) -> dict:
    import ray

    src = tmp / f"release-{requests}"
    t0 = time.perf_counter()
    shape = write_release_day(src, cfg.day, requests, cfg.candidates, cfg.seed)
    write_s = time.perf_counter() - t0
    conv = ray.get(ray.remote(num_cpus=1, max_calls=1)(convert_in_fresh_process).remote(
        str(src), str(tmp / f"out-{requests}")))
    pickles = {name: _pickle_mib(src / name / f"{cfg.day}.pkl")
               for name in ("seq_effective_50_dict", "request_id_dict")}
    files = {str(p.relative_to(src)): p.stat().st_size / 2**20 for p in src.rglob("*") if p.is_file()}
    return {"requests": requests, **shape, "release_file_mib": files, "release_write_s": write_s, **conv,
            "requests_per_s": conv["requests"] / conv["wall_s"], "pickle_loaded_mib": pickles}


def run_convert_bench(cfg: ConvertBenchConfig, out_dir: Path) -> dict:
    if len(cfg.requests) != 2 or cfg.requests[0] >= cfg.requests[1]:
        raise ValueError(f"requests: expected two increasing day sizes, got {cfg.requests}")
    out_dir = Path(out_dir)
    ensure_ray()
    with tempfile.TemporaryDirectory() as tmp:
        sizes = [_one_size(cfg, r, Path(tmp)) for r in cfg.requests]
    (r0, p0), (r1, p1) = ((s["requests"], s["peak_rss_mib"]) for s in sizes)
    slope = (p1 - p0) / (r1 - r0)  # MiB per request
    full = p1 + slope * (cfg.full_day_requests - r1)
    result = {
        "config": asdict(cfg), "python": sys.version.split()[0], "sizes": sizes,
        "ratios": {
            "peak_rss_mib_small": p0, "peak_rss_mib_large": p1,
            "peak_rss_kib_per_request": 1024 * slope,
            "largest_pickle_kib_per_request": 1024 * max(sizes[1]["pickle_loaded_mib"].values()) / r1,
            "requests_per_s": sizes[1]["requests_per_s"],
            "extrapolated_full_day_peak_gib": full / 1024,
            "within_memory_limit": float(full / 1024 <= cfg.memory_limit_gib),
        },
        "extrapolation": f"peak(R) = peak({r1}) + (R - {r1}) x slope through ({r0}, {r1}); R = {cfg.full_day_requests}",
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "convert.json").write_text(json.dumps(result, indent=2))
    _plot(result, cfg, out_dir / "convert.png")
    return result


def _plot(result: dict, cfg: ConvertBenchConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [s["requests"] for s in result["sizes"]]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.plot(xs, [s["peak_rss_mib"] / 1024 for s in result["sizes"]], "o-", label="converter peak RSS (measured)")
    ax.plot([xs[-1], cfg.full_day_requests], [result["sizes"][-1]["peak_rss_mib"] / 1024,
                                              result["ratios"]["extrapolated_full_day_peak_gib"]], "o--",
            label="extrapolated")
    ax.plot(xs, [max(s["pickle_loaded_mib"].values()) / 1024 for s in result["sizes"]], "s:",
            label="largest pickle, loaded")
    ax.axhline(cfg.memory_limit_gib, color="r", ls="--", label="limit")
    ax.set_xlabel("requests in the day")
    ax.set_ylabel("GiB")
    ax.set_title(f"RecFlow convert, {result['sizes'][0]['candidates_per_request']} candidates per request")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
