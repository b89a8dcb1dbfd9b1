"""The RecFlow converter on a fixture in the exact release layout (see recflow_fixture.py)."""

from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from cascadelab.platform.data import recflow
from cascadelab.platform.data.recflow import convert_recflow, find_layout, select_days
from cascadelab.platform.data.schema import (
    GROUPS_THREE_STAGE,
    GROUPS_TWO_STAGE,
    ITEM_FIELDS,
    DataError,
    DatasetMeta,
    arrow_schema,
    check_table_schema,
    day_dir,
    stored_groups,
)
from tests.platform.data.diskfull import ENOSPC_REASON, fill_ipc_writes, fill_parquet_writes
from tests.platform.data.recflow_fixture import DAYS, MISSES, SPECIAL_RID, write_recflow_fixture

VOCAB = {"user_id": 20, "device_id": 15, "age": 8, "gender": 3, "province": 34,
         "video_id": 251,  # id_cnt says 150 ('photo_id'), the data has video 250
         "author_id": 37,  # id_cnt says 30, the data has author 36
         "category_level_two": 23,  # id_cnt key ' category_level_two'
         "category_level_one": 5, "upload_type": 3}


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    """The fixture release under <dir>/data/ (the reference loaders' layout); do not modify."""
    root = tmp_path_factory.mktemp("recflow")
    write_recflow_fixture(root, data_subdir=True)
    return root


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out") / "two"
    convert_recflow(release, out)
    return out


@pytest.fixture
def src(release, tmp_path) -> Path:
    """A copy of the release (root layout, no data/) that the test may break."""
    return Path(shutil.copytree(release / "data", tmp_path / "src"))


def _table(out: Path, day: str):
    files = sorted(day_dir(out, day).glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files])


def _row(out: Path, day: str, rid: int) -> dict:
    t = _table(out, day)
    rows = t.filter(pc.equal(t["request_id"], rid)).to_pylist()
    assert len(rows) == 1
    return rows[0]


def _g(row: dict, g: str) -> tuple[np.ndarray, list, list]:
    return np.array(row[f"{g}_items"]).reshape(10, len(ITEM_FIELDS)), row[f"{g}_mask"], row[f"{g}_label"]


def _mtimes(out: Path, day: str) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in day_dir(out, day).glob("*.parquet")}


def _age(out: Path, day: str) -> None:
    """Back-date the day's files so that a rewrite shows in mtime whatever the clock resolution."""
    for p in day_dir(out, day).glob("*.parquet"):
        os.utime(p, ns=(10**18, 10**18))


def test_schema_rows_and_metadata(release, converted):
    meta = DatasetMeta.read(converted)
    assert meta.mode == "two_stage" and meta.source == "recflow" and meta.days == list(DAYS)
    assert meta.rows_per_day == {d: 30 for d in DAYS}
    assert meta.vocab == VOCAB
    assert meta.extra["lookup_misses"] == MISSES["two_stage"]
    assert meta.extra["lookup_misses_total"] == {"rank_pos": 2}
    assert meta.extra["src"] == str(release / "data")  # <src>/data/ detected as the root
    for day in DAYS:
        for f in day_dir(converted, day).glob("*.parquet"):
            check_table_schema(pq.read_schema(f), arrow_schema("two_stage"), f)
        t = _table(converted, day)
        assert t.schema.equals(arrow_schema("two_stage"))
        assert t.num_rows == 30 and len(set(t["request_id"].to_pylist())) == 30
    assert not list(converted.glob(".tmp-*"))


def test_hand_checked_request_in_pinned_time_zone(release, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TZ", "America/Los_Angeles")  # the host zone must not matter
    time.tzset()
    try:
        with caplog.at_level("INFO", logger="cascadelab.platform.data.recflow"):
            convert_recflow(release, tmp_path / "o", days=[DAYS[0]])
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert any("peak RSS" in r.getMessage() for r in caplog.records)
    r = _row(tmp_path / "o", DAYS[0], SPECIAL_RID)
    # raw user 4, device 9, age 2, gender 1, province 17 -> +1
    assert [r[k] for k in ("user_id", "device_id", "age", "gender", "province")] == [5, 10, 3, 2, 18]
    # 1705077000123 ms = Sat 2024-01-13 00:30 Asia/Shanghai: weekday 5 (Mon = 0), hour 0, minute 30, +1
    assert r["request_ts"] == 1705077000123
    assert (r["req_weekday"], r["req_hour"], r["req_minute"]) == (6, 1, 31)
    seq = np.array(r["seq_items"]).reshape(50, 5)
    assert r["seq_mask"] == [0] * 47 + [1, 1, 1]
    assert (seq[:47] == 0).all()  # row 0 holds junk with request_ts 0: padding
    # [vid, aid, cate2, cate1, utype] + 1; cate_one 0 -> 1 (shifted like every id)
    assert seq[47:].tolist() == [[12, 6, 8, 1, 3], [13, 7, 9, 5, 1], [14, 37, 23, 2, 2]]
    items, mask, label = _g(r, "rank_pos")
    # raw [50, 7, dur, cate2 3, utype 1, Wed 23:59 Shanghai, cate1 0, ev] -> vid, aid, cate2, cate1, utype,
    # upload weekday Wed (2) + 1, hour 23 + 1, minute 59 + 1
    assert items[:3].tolist() == [[51, 8, 4, 1, 2, 3, 24, 60], [52, 9, 5, 3, 1, 3, 9, 1],
                                  [53, 10, 6, 5, 3, 3, 24, 60]]
    # slot 3 (video 53) is missing from all_stage: invalid, not -470; slots 4.. are padding
    assert mask == [1, 1, 1] + [0] * 7
    assert label == [28.0, 29.0, 25.0] + [0.0] * 7  # 30 - rank_index (2, 1, 5)
    assert (items[3:] == 0).all()
    items, mask, label = _g(r, "rank_neg")
    assert items[0].tolist() == [71, 37, 10, 2, 3, 3, 9, 1] and mask == [1] * 10 and label == [7.0] * 10
    items, mask, label = _g(r, "coarse_neg")  # 12 rows stored: the first 10 are taken
    assert items[:, 0].tolist() == [251] + list(range(81, 90))
    assert mask == [1] * 10 and label == [6.0] * 10
    items, mask, label = _g(r, "prerank_neg")  # stage absent for this request
    assert (items == 0).all() and mask == [0] * 10 and label == [0.0] * 10


def test_padding_and_label_invariants(converted):
    grades = {"rank_neg": 7.0, "coarse_neg": 6.0, "prerank_neg": 5.0}
    for day in DAYS:
        t = _table(converted, day)
        n = t.num_rows
        seq = np.stack(t["seq_items"].to_numpy(zero_copy_only=False)).reshape(n, 50, 5)
        smask = np.stack(t["seq_mask"].to_numpy(zero_copy_only=False)).astype(bool)
        assert (seq[~smask] == 0).all() and (seq[smask] > 0).all()
        assert smask.sum() > 0 and (~smask).sum() > 0
        for g in GROUPS_TWO_STAGE:
            items = np.stack(t[f"{g}_items"].to_numpy(zero_copy_only=False)).reshape(n, 10, 8)
            mask = np.stack(t[f"{g}_mask"].to_numpy(zero_copy_only=False)).astype(bool)
            label = np.stack(t[f"{g}_label"].to_numpy(zero_copy_only=False))
            assert (items[~mask] == 0).all() and (label[~mask] == 0).all()
            assert (items[mask] > 0).all() and (items[..., 0] <= VOCAB["video_id"]).all()
            assert (~mask).any()  # the fixture plants short groups
            if g == "rank_pos":
                assert ((label[mask] >= 20) & (label[mask] <= 29)).all()
            else:
                assert (label[mask] == grades[g]).all()


def test_three_stage(release, tmp_path):
    meta = convert_recflow(release, tmp_path / "t", mode="three_stage")
    assert meta.mode == "three_stage" and meta.extra["lookup_misses"] == MISSES["three_stage"]
    t = _table(tmp_path / "t", DAYS[0])
    assert t.schema.equals(arrow_schema("three_stage"))
    assert set(GROUPS_THREE_STAGE) | {"rank_pos"} == set(stored_groups("three_stage"))
    r = _row(tmp_path / "t", DAYS[0], SPECIAL_RID)
    items, mask, label = _g(r, "rerank_pos")
    assert items[:2].tolist() == [[61, 12, 8, 4, 1, 3, 9, 1], [62, 13, 9, 1, 2, 3, 24, 60]]
    assert mask == [1, 1] + [0] * 8 and label == [27.0, 29.0] + [0.0] * 8  # 30 - rerank_index (3, 1)
    assert _g(r, "rank_pos")[2] == [28.0, 29.0, 25.0] + [0.0] * 7
    _, mask, label = _g(r, "rerank_neg")  # absent stage
    assert mask == [0] * 10 and label == [0.0] * 10
    neg = np.stack(t["rerank_neg_label"].to_numpy(zero_copy_only=False))
    assert set(np.unique(neg)) == {0.0, 8.0}
    # request 1's first rerank_pos video is missing from all_stage: masked, the others kept
    _, mask, label = _g(_row(tmp_path / "t", DAYS[0], SPECIAL_RID + 1), "rerank_pos")
    assert mask[0] == 0 and label[0] == 0.0 and mask[1] == 1 and 20 <= label[1] <= 29


def test_rerun_skips_finished_days_and_force_rewrites(src, tmp_path):
    out = tmp_path / "o"
    convert_recflow(src, out)
    for d in DAYS:
        _age(out, d)
    before = {d: _mtimes(out, d) for d in DAYS}
    meta = convert_recflow(src, out)
    assert {d: _mtimes(out, d) for d in DAYS} == before  # nothing rewritten
    assert meta.days == list(DAYS) and meta.extra["lookup_misses"] == MISSES["two_stage"]
    convert_recflow(src, out, days=[DAYS[1]], force=True)
    assert _mtimes(out, DAYS[0]) == before[DAYS[0]] and _mtimes(out, DAYS[1]) != before[DAYS[1]]
    assert DatasetMeta.read(out).days == list(DAYS)


def test_interrupted_run_leaves_finished_days_valid_and_resumes(src, tmp_path, monkeypatch):
    out = tmp_path / "o"
    real = recflow.convert_day

    def interrupt_second_day(layout, day, mode, writer, chunk=recflow.CHUNK):
        if day == DAYS[1]:
            raise KeyboardInterrupt
        return real(layout, day, mode, writer, chunk)

    monkeypatch.setattr(recflow, "convert_day", interrupt_second_day)
    with pytest.raises(KeyboardInterrupt):
        convert_recflow(src, out)
    meta = DatasetMeta.read(out)
    assert meta.days == [DAYS[0]] and meta.rows_per_day == {DAYS[0]: 30}
    assert not day_dir(out, DAYS[1]).exists()
    monkeypatch.setattr(recflow, "convert_day", real)
    _age(out, DAYS[0])
    before = _mtimes(out, DAYS[0])
    meta = convert_recflow(src, out)
    assert meta.days == list(DAYS) and _mtimes(out, DAYS[0]) == before


def test_failing_day_leaves_written_days_untouched(src, tmp_path):
    out = tmp_path / "o"
    convert_recflow(src, out)
    for d in DAYS:
        _age(out, d)
    before = {d: _mtimes(out, d) for d in DAYS}
    meta_before = (out / "dataset.json").read_text()
    path = src / "request_id_dict" / f"{DAYS[1]}.pkl"
    d = pickle.loads(path.read_bytes())
    d.pop(np.int64(2_000_007))
    path.write_bytes(pickle.dumps(d))
    with pytest.raises(DataError, match=r"request_id_dict/2024-01-14\.pkl'.*request_id 2000007"):
        convert_recflow(src, out, force=True)
    assert _mtimes(out, DAYS[0]) != before[DAYS[0]]  # day 1 was rewritten before day 2 failed
    assert _mtimes(out, DAYS[1]) == before[DAYS[1]]  # the failing day's old files are intact
    meta = DatasetMeta.read(out)
    assert meta.days == list(DAYS) and (out / "dataset.json").read_text() == meta_before
    assert not list(out.glob(".tmp-*")) and _table(out, DAYS[1]).num_rows == 30


def _drop_column(src: Path, day: str, column: str) -> None:
    p = src / "all_stage" / f"{day}.feather"
    pd.read_feather(p).drop(columns=[column]).to_feather(p)


def _drop_key(src: Path, sub: str, day: str, rid: int) -> None:
    p = src / sub / f"{day}.pkl"
    d = pickle.loads(p.read_bytes())
    d = {k: v for k, v in d.items() if int(k) != rid}
    p.write_bytes(pickle.dumps(d))


BAD_INPUTS = {
    "missing src": (lambda s: shutil.rmtree(s), {}, r"RecFlow source '.*src' does not exist"),
    "no all_stage": (lambda s: shutil.rmtree(s / "all_stage"), {}, r"no all_stage/ directory in '.*src'"),
    "missing day": (lambda s: None, {"days": ["2024-01-15"]},
                    r"'.*all_stage/2024-01-15\.feather' is missing"),
    "bad day": (lambda s: None, {"days": ["2024-1-5"]}, r"--days '2024-1-5': expected a date YYYY-MM-DD"),
    "missing seq pkl": (lambda s: (s / "seq_effective_50_dict" / f"{DAYS[1]}.pkl").unlink(), {},
                        r"'.*seq_effective_50_dict/2024-01-14\.pkl' is missing"),
    "missing request pkl": (lambda s: (s / "request_id_dict" / f"{DAYS[0]}.pkl").unlink(), {},
                            r"'.*request_id_dict/2024-01-13\.pkl' is missing"),
    "missing column": (lambda s: _drop_column(s, DAYS[1], "rank_index"), {},
                       r"all_stage/2024-01-14\.feather': missing column 'rank_index'"),
    "missing rerank column": (lambda s: _drop_column(s, DAYS[0], "rerank_index"), {"mode": "three_stage"},
                              r"all_stage/2024-01-13\.feather': missing column 'rerank_index'"),
    "rid not in seq dict": (lambda s: _drop_key(s, "seq_effective_50_dict", DAYS[0], 1_000_003), {},
                            r"seq_effective_50_dict/2024-01-13\.pkl': request_id 1000003 .* not a key"),
    "rid not in request dict": (lambda s: _drop_key(s, "request_id_dict", DAYS[0], 1_000_004), {},
                                r"request_id_dict/2024-01-13\.pkl': request_id 1000004 .* not a key"),
    "missing id_cnt": (lambda s: (s / "others" / "id_cnt.pkl").unlink(), {},
                       r"'.*others/id_cnt\.pkl' is missing"),
    "corrupt pkl": (lambda s: (s / "request_id_dict" / f"{DAYS[0]}.pkl").write_bytes(b"not a pickle"), {},
                    r"request_id_dict/2024-01-13\.pkl': not a readable pickle"),
    "unknown mode": (lambda s: None, {"mode": "four_stage"},
                     r"mode 'four_stage': expected two_stage or three_stage"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_one_line_data_error(case, src, tmp_path):
    breaker, kwargs, pattern = BAD_INPUTS[case]
    breaker(src)
    out = tmp_path / "o"
    with pytest.raises(DataError, match=pattern) as exc:
        convert_recflow(src, out, **kwargs)
    assert "\n" not in str(exc.value)
    assert not out.exists() or not any(out.glob("day=*")) and not (out / "dataset.json").exists()


def test_refuses_an_output_of_another_mode(converted, release):
    with pytest.raises(DataError, match=r"dataset\.json': mode 'two_stage', expected 'three_stage'"):
        convert_recflow(release, converted, mode="three_stage")


def test_select_days(release):
    layout = find_layout(release)
    assert layout.root == release / "data" and layout.available_days() == list(DAYS)
    assert select_days(layout) == list(DAYS)
    assert select_days(layout, start=DAYS[1]) == [DAYS[1]]
    assert select_days(layout, start="2024-01-12", end=DAYS[0]) == ["2024-01-12", DAYS[0]]
    assert select_days(layout, [DAYS[1], DAYS[0], DAYS[1]]) == list(DAYS)
    with pytest.raises(DataError, match="before --start-day"):
        select_days(layout, start=DAYS[1], end=DAYS[0])


def test_readable_by_ingest(converted):
    from cascadelab.platform.data.ingest import arrow_to_tensors, day_files

    files = day_files(converted, DAYS[0], "two_stage", GROUPS_TWO_STAGE)
    batch = arrow_to_tensors(pq.read_table(files), GROUPS_TWO_STAGE)
    assert batch["user"].shape == (30, 8) and batch["seq"].shape == (30, 50, 5)
    assert batch["items"].shape == (30, 40, 8) and batch["mask"].shape == (30, 40)
    assert batch["label"].shape == (30, 40)
    assert not batch["label"][~batch["mask"]].any()


def test_chunking_does_not_change_the_output(release, converted, tmp_path, monkeypatch):
    monkeypatch.setattr(recflow, "SLICE", 10)  # all_stage slices smaller than its record batches
    convert_recflow(release, tmp_path / "c", chunk=7, rows_per_file=8)  # 5 request chunks, 4 files a day
    for day in DAYS:
        assert len(list(day_dir(tmp_path / "c", day).glob("*.parquet"))) == 4
        assert _table(tmp_path / "c", day).equals(_table(converted, day))


@pytest.mark.parametrize("protocol", [2, 4])
def test_older_pickle_protocols_convert_identically(src, converted, tmp_path, protocol):
    for sub in ("request_id_dict", "seq_effective_50_dict"):
        for day in DAYS:
            path = src / sub / f"{day}.pkl"
            path.write_bytes(pickle.dumps(pickle.loads(path.read_bytes()), protocol=protocol))
    convert_recflow(src, tmp_path / "p")
    for day in DAYS:
        assert _table(tmp_path / "p", day).equals(_table(converted, day))


def test_candidate_pickle_with_foreign_objects_is_refused(src, tmp_path):
    path = src / "request_id_dict" / f"{DAYS[0]}.pkl"
    path.write_bytes(pickle.dumps({np.int64(1): {"rank_pos": pd.Timestamp("2024-01-01")}}))
    with pytest.raises(DataError, match=r"request_id_dict/2024-01-13\.pkl': refers to 'pandas\..*', expected only "
                                        r"NumPy arrays .*; expected a dict"):
        convert_recflow(src, tmp_path / "o")


# ---------------------------------------------------------------------------------------------- disk full


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in [*out.glob(".tmp-*"), *out.glob(".old-*"), *out.glob("*.tmp")])


def test_disk_full_on_a_day_keeps_the_finished_days_and_resumes(src, tmp_path, monkeypatch):
    out = tmp_path / "o"
    seen = fill_parquet_writes(monkeypatch, lambda p: p.parent.name == f".tmp-day={DAYS[1]}")
    with pytest.raises(DataError) as exc:
        convert_recflow(src, out, rows_per_file=16)
    assert str(exc.value) == (f"'{out / f'.tmp-day={DAYS[1]}' / 'part-00000.parquet'}': could not be written "
                              f"({ENOSPC_REASON})")
    assert seen[-1].parent.name == f".tmp-day={DAYS[1]}"
    meta = DatasetMeta.read(out)
    assert meta.days == [DAYS[0]] and meta.rows_per_day == {DAYS[0]: 30}  # dataset.json: the failed day absent
    assert not day_dir(out, DAYS[1]).exists() and _leftovers(out) == []
    assert _table(out, DAYS[0]).num_rows == 30
    monkeypatch.undo()
    _age(out, DAYS[0])
    before = _mtimes(out, DAYS[0])
    meta = convert_recflow(src, out, rows_per_file=16)  # the rerun converts only the failed day
    assert meta.days == list(DAYS) and _mtimes(out, DAYS[0]) == before and _table(out, DAYS[1]).num_rows == 30


@pytest.mark.parametrize("fault", ["second part file", "sequence spill"])
def test_disk_full_under_force_keeps_the_previous_version_of_the_day(src, tmp_path, monkeypatch, fault):
    out = tmp_path / "o"
    convert_recflow(src, out, days=[DAYS[0]], rows_per_file=16)
    _age(out, DAYS[0])
    before, meta_before = _mtimes(out, DAYS[0]), (out / "dataset.json").read_text()
    if fault == "second part file":
        fill_parquet_writes(monkeypatch, lambda p: p.name == "part-00001.parquet")
        where = out / f".tmp-day={DAYS[0]}" / "part-00001.parquet"
    else:
        fill_ipc_writes(monkeypatch, after=1)
        where = out / f".tmp-day={DAYS[0]}" / recflow.SPILL_FILE
    with pytest.raises(DataError) as exc:
        convert_recflow(src, out, days=[DAYS[0]], rows_per_file=16, chunk=8, force=True)
    assert str(exc.value) == f"'{where}': could not be written ({ENOSPC_REASON})"
    assert _mtimes(out, DAYS[0]) == before and _table(out, DAYS[0]).num_rows == 30
    assert (out / "dataset.json").read_text() == meta_before and _leftovers(out) == []


def test_disk_full_on_dataset_json_keeps_the_previous_one(src, tmp_path, monkeypatch):
    out = tmp_path / "o"
    convert_recflow(src, out, days=[DAYS[0]])
    meta_before = (out / "dataset.json").read_text()

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, ENOSPC_REASON)

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(DataError, match=rf"'{re.escape(str(out / 'dataset.json'))}': could not be written"):
        convert_recflow(src, out, days=[DAYS[1]])
    monkeypatch.undo()
    assert (out / "dataset.json").read_text() == meta_before and _leftovers(out) == []
    assert DatasetMeta.read(out).days == [DAYS[0]]  # the new day is on disk but not listed: a rerun redoes it
    assert convert_recflow(src, out).days == list(DAYS)
