import errno
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cascadelab.cascade.batch import CascadeBatch
from cascadelab.cascade.metrics import metric_sums
from cascadelab.platform.data.ingest import arrow_to_tensors
from cascadelab.platform.data.schema import (
    GROUPS_THREE_STAGE,
    GROUPS_TWO_STAGE,
    DataError,
    DatasetMeta,
    arrow_schema,
    day_dir,
    groups_for,
)
from cascadelab.platform.data.synthetic import SyntheticConfig, _build_world, generate, utility
from cascadelab.platform.data.timefeat import day_start_ms, local_time_features


def _read(root, day):
    return pq.read_table(sorted(day_dir(root, day).glob("*.parquet"))[0])


def test_generator_is_deterministic_for_a_seed(tmp_path):
    cfg = SyntheticConfig(days=2, requests_per_day=64, seed=3)
    a, b = generate(cfg, tmp_path / "a"), generate(cfg, tmp_path / "b")
    c = generate(SyntheticConfig(days=2, requests_per_day=64, seed=4), tmp_path / "c")
    assert a == b
    for day in a.days:
        assert _read(tmp_path / "a", day).equals(_read(tmp_path / "b", day))
    assert not _read(tmp_path / "a", a.days[0]).equals(_read(tmp_path / "c", c.days[0]))


def test_written_schema_metadata_and_padding(tmp_path):
    meta = generate(SyntheticConfig(days=2, requests_per_day=200, seed=1, pad_prob=0.5), tmp_path / "d")
    back = DatasetMeta.read(tmp_path / "d")
    assert back == meta and back.days == ["2024-01-13", "2024-01-14"]
    assert back.rows_per_day == {"2024-01-13": 200, "2024-01-14": 200}
    assert back.extra["world"] == {"popularity_skew": 1.0, "preference_strength": 2.0, "popularity_weight": 0.3,
                                   "funnel_noise": 0.5, "item_spread": 0.5, "pad_prob": 0.5}
    t = _read(tmp_path / "d", "2024-01-13")
    assert t.schema.equals(arrow_schema("two_stage"))
    for g in GROUPS_TWO_STAGE:
        items = np.stack(t.column(f"{g}_items").to_numpy(zero_copy_only=False)).reshape(200, 10, 8)
        mask = np.stack(t.column(f"{g}_mask").to_numpy(zero_copy_only=False)).astype(bool)
        label = np.stack(t.column(f"{g}_label").to_numpy(zero_copy_only=False))
        assert (~mask).any() and mask[:, 0].all()  # some padding, never an empty group
        assert (items[~mask] == 0).all() and (label[~mask] == 0).all()
        assert (items[mask] > 0).all()
        assert (items[..., 0][mask] <= meta.vocab["video_id"]).all()
    pos = np.stack(t.column("rank_pos_label").to_numpy(zero_copy_only=False))
    assert pos[:, 0].min() == 29 and pos[pos > 0].min() >= 20  # 30 - rank_index, graded
    neg = np.stack(t.column("prerank_neg_label").to_numpy(zero_copy_only=False))
    assert set(np.unique(neg)) <= {0.0, 5.0}


def test_three_stage_groups(tmp_path):
    generate(SyntheticConfig(days=1, requests_per_day=32, mode="three_stage"), tmp_path / "t")
    t = _read(tmp_path / "t", "2024-01-13")
    for g in GROUPS_THREE_STAGE:
        assert f"{g}_items" in t.column_names


def test_refuses_to_overwrite_without_flag(tmp_path):
    generate(SyntheticConfig(days=1, requests_per_day=8), tmp_path / "x")
    before = (tmp_path / "x" / "dataset.json").read_text()
    with pytest.raises(DataError, match="not empty; pass --overwrite"):
        generate(SyntheticConfig(days=1, requests_per_day=8, seed=9), tmp_path / "x")
    assert (tmp_path / "x" / "dataset.json").read_text() == before


def test_time_features_use_shanghai_not_the_host(monkeypatch):
    import time

    monkeypatch.setenv("TZ", "America/Los_Angeles")
    time.tzset()
    try:
        start = day_start_ms("2024-01-13")
        wd, hr, mi = local_time_features(np.array([start, start + 3_600_000 * 13 + 60_000 * 7]))
        assert wd.tolist() == [5, 5] and hr.tolist() == [0, 13] and mi.tolist() == [0, 7]  # Saturday
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


@pytest.mark.integration
def test_ray_parallel_generation_matches_sequential(tmp_path, ray_local):
    cfg = SyntheticConfig(days=2, requests_per_day=300, seed=11, rows_per_file=128)  # 3 chunks a day
    seq = generate(cfg, tmp_path / "seq", parallel=False)
    par = generate(cfg, tmp_path / "par", parallel=True)
    assert seq == par
    for day in seq.days:
        files = sorted(p.name for p in day_dir(tmp_path / "seq", day).glob("*.parquet"))
        assert files == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
        assert pq.read_table(day_dir(tmp_path / "seq", day)).equals(pq.read_table(day_dir(tmp_path / "par", day)))


# ---------------------------------------------------------------------------------------------- oracle


def _world_scores(cfg, root, day, groups):
    """(CascadeBatch of the written day over ``groups``, utility and log-popularity scores [B, n]) rebuilt
    from the Parquet file and the seeded world, independently of the generator's own bookkeeping."""
    table = pq.read_table(day_dir(root, day))
    batch = CascadeBatch.from_dict(arrow_to_tensors(table, groups))
    w = _build_world(cfg)
    users = table.column("user_id").to_numpy() - 1
    items = np.clip(batch.items[..., 0].numpy() - 1, 0, None)  # padded slots hold id 0; they are masked
    util = utility(cfg, w, w.user_vec[users], items)
    return batch, torch.from_numpy(util), torch.from_numpy(w.item_logpop[items])


@pytest.mark.parametrize("mode, view, ks", [("two_stage", "two_stage", [30, 20]),
                                            ("three_stage", "three_stage", [40, 30, 20]),
                                            ("three_stage", "two_stage", [30, 20])])
def test_oracle_is_the_cascade_metric_of_the_noise_free_utility(tmp_path, mode, view, ks):
    cfg = SyntheticConfig(days=2, requests_per_day=300, seed=5, pad_prob=0.5, mode=mode, rows_per_file=128)
    meta = generate(cfg, tmp_path / "d")
    recorded = DatasetMeta.read(tmp_path / "d").extra["oracle"]
    assert recorded == meta.extra["oracle"] and (recorded["gt_k"], recorded["k"]) == (10, 20)
    day = meta.days[1]
    batch, util, pop = _world_scores(cfg, tmp_path / "d", day, groups_for(view))
    got = recorded[view]["per_day"][day]
    assert got["requests"] == 300
    for name, scores in (("oracle", util), ("popularity", pop)):
        sums = metric_sums([scores] * len(ks), ks, batch, gt_k=10)
        assert got[name] == pytest.approx(sums["joint_recall"] / sums["count"], abs=1e-6), name
    rng = torch.Generator().manual_seed(0)
    draws = [metric_sums([torch.rand(util.shape, generator=rng)] * len(ks), ks, batch) for _ in range(200)]
    assert got["random"] == pytest.approx(np.mean([d["joint_recall"] / d["count"] for d in draws]), abs=0.005)
    days = recorded[view]["per_day"]
    overall = recorded[view]["overall"]
    assert overall["requests"] == 600
    assert overall["oracle"] == pytest.approx(np.mean([days[d]["oracle"] for d in meta.days]), abs=1e-6)


def test_item_spread_is_how_far_items_stray_from_their_category():
    """item_spread 0: every item of a category has the category's vector, so the world's preference is
    a function of categories alone; the default keeps items apart within a category."""
    alike = _build_world(SyntheticConfig(item_spread=0.0))
    apart = _build_world(SyntheticConfig())
    for w, same in ((alike, True), (apart, False)):
        first = {}
        for item, cate in enumerate(w.item_cate2):
            first.setdefault(cate, item)
        pairs = [(i, first[c]) for i, c in enumerate(w.item_cate2) if first[c] != i]
        assert pairs
        equal = [np.array_equal(w.item_vec[i], w.item_vec[j]) for i, j in pairs]
        assert all(equal) if same else not any(equal)


def test_oracle_on_the_embedded_default_bounds_the_task(tmp_path):
    meta = generate(SyntheticConfig(days=1, requests_per_day=1024, seed=0), tmp_path / "d")
    o = meta.extra["oracle"]["two_stage"]["overall"]
    assert set(meta.extra["oracle"]) == {"gt_k", "k", "two_stage"}  # two-stage data serves two-stage runs only
    assert 0.97 < o["oracle"] < 1.0 and o["oracle"] > o["affinity"] > o["popularity"] > o["random"] > 0.5
    noisy = generate(SyntheticConfig(days=1, requests_per_day=1024, seed=0, funnel_noise=2.0), tmp_path / "n")
    assert noisy.extra["oracle"]["two_stage"]["overall"]["oracle"] < o["oracle"] - 0.1  # noise caps the ceiling


# ---------------------------------------------------------------------------------------------- disk full


def _enospc_on(monkeypatch, nth: int):
    """``pq.write_table`` fails like a full disk on its ``nth`` call: a few bytes reach the file first."""
    real = pq.write_table
    calls = []

    def write_table(table, where, *args, **kwargs):
        calls.append(where)
        if len(calls) == nth:
            Path(where).write_bytes(b"PAR1" + b"\0" * 100)  # a half-written file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(table, where, *args, **kwargs)

    monkeypatch.setattr(pq, "write_table", write_table)
    return calls


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in [*root.parent.glob(f".{root.name}.*"), *root.glob(".tmp-*"), *root.glob(".old-*")]
                  if p.exists())


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("nth", [2, 3])  # a day's second chunk; the second day
def test_disk_full_keeps_the_existing_dataset_under_overwrite(tmp_path, monkeypatch, nth):
    root = tmp_path / "data"
    cfg = SyntheticConfig(days=2, requests_per_day=100, rows_per_file=64, seed=1)  # 2 chunks a day
    generate(cfg, root)
    before = _snapshot(root)
    calls = _enospc_on(monkeypatch, nth)
    with pytest.raises(DataError) as exc:
        generate(SyntheticConfig(days=2, requests_per_day=100, rows_per_file=64, seed=2), root, overwrite=True,
                 parallel=False)  # the injected fault lives in this process, not in Ray workers
    assert str(exc.value) == f"'{calls[-1]}': could not be written (No space left on device)"
    assert "\n" not in str(exc.value) and len(calls) == nth
    assert _snapshot(root) == before  # the old dataset, byte for byte, dataset.json included
    assert _leftovers(root) == []
    monkeypatch.undo()
    assert generate(cfg, tmp_path / "again").rows_per_day == DatasetMeta.read(root).rows_per_day


def test_disk_full_on_a_new_output_leaves_nothing(tmp_path, monkeypatch):
    root = tmp_path / "new" / "data"
    _enospc_on(monkeypatch, 1)
    with pytest.raises(DataError, match=r"part-00000\.parquet': could not be written \(No space left on device\)"):
        generate(SyntheticConfig(days=1, requests_per_day=16), root, parallel=False)
    assert not root.exists() and _leftovers(root) == []


def test_disk_full_while_writing_dataset_json(tmp_path, monkeypatch):
    root = tmp_path / "data"
    generate(SyntheticConfig(days=1, requests_per_day=16), root)
    before = _snapshot(root)

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(DataError, match=r"dataset\.json': could not be written \(No space left on device\)"):
        generate(SyntheticConfig(days=1, requests_per_day=16, seed=4), root, overwrite=True, parallel=False)
    assert _snapshot(root) == before and _leftovers(root) == []


def test_a_real_write_failure_in_the_cli_is_one_line_and_changes_nothing(tmp_path):
    """A real failing write, no mock: the child's file size limit (RLIMIT_FSIZE) stops the first Parquet
    file part-way (EFBIG, "File too large"), as a full disk stops it with ENOSPC."""
    root = tmp_path / "data"
    generate(SyntheticConfig(days=1, requests_per_day=16), root)
    before = _snapshot(root)

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failing write() instead of a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))

    proc = subprocess.run([sys.executable, "-m", "cascadelab.jobs.generate", "--out", str(root), "--days", "1",
                           "--requests-per-day", "300", "--overwrite"], capture_output=True, text=True,
                          preexec_fn=limit_file_size, timeout=300, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("cascadelab:")]
    assert proc.returncode == 2, proc.stderr
    assert len(errors) == 1 and re.fullmatch(
        rf"cascadelab: error: '{re.escape(str(tmp_path))}/\.data\.tmp-\w+/day=2024-01-13/part-00000\.parquet': "
        r"could not be written \(.*File too large.*\)", errors[0]), errors
    assert _snapshot(root) == before and _leftovers(root) == []
