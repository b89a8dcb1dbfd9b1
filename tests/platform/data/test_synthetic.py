import numpy as np
import pyarrow.parquet as pq
import pytest

from cascadelab.platform.data.schema import (
    GROUPS_THREE_STAGE,
    GROUPS_TWO_STAGE,
    DataError,
    DatasetMeta,
    arrow_schema,
    day_dir,
)
from cascadelab.platform.data.synthetic import SyntheticConfig, generate
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
