"""DayWriter: a day appears complete or not at all; a failed write names the file and keeps the previous day."""

from __future__ import annotations

import errno
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cascadelab.platform.data.daywriter import DayWriter
from cascadelab.platform.data.schema import DataError, day_dir
from tests.platform.data.diskfull import ENOSPC_REASON, fill_parquet_writes

SCHEMA = pa.schema([pa.field("x", pa.int64(), nullable=False)])


def _t(a, b):
    return pa.table({"x": pa.array(range(a, b), pa.int64())}, schema=SCHEMA)


def test_streamed_tables_fill_files_of_fixed_size(tmp_path):
    with DayWriter(tmp_path, "2024-01-01", SCHEMA, rows_per_file=4) as w:
        for a, b in ((0, 3), (3, 9), (9, 10)):
            w.write(_t(a, b))
        assert not day_dir(tmp_path, "2024-01-01").exists()  # nothing visible before commit
        assert w.commit() == 10
    files = sorted(day_dir(tmp_path, "2024-01-01").glob("*.parquet"))
    assert [pq.read_metadata(f).num_rows for f in files] == [4, 4, 2]
    assert pq.read_table(files).column("x").to_pylist() == list(range(10))
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob(".old-*"))


def test_failure_keeps_the_previous_day_and_cleans_up(tmp_path):
    with DayWriter(tmp_path, "2024-01-01", SCHEMA, 4) as w:
        w.write(_t(0, 2))
        w.commit()
    with pytest.raises(RuntimeError), DayWriter(tmp_path, "2024-01-01", SCHEMA, 4) as w:
        w.write(_t(5, 9))
        raise RuntimeError("interrupted")
    assert pq.read_table(day_dir(tmp_path, "2024-01-01")).column("x").to_pylist() == [0, 1]
    assert not list(tmp_path.glob(".tmp-*"))


def test_empty_day_has_one_file_with_the_schema(tmp_path):
    with DayWriter(tmp_path, "2024-01-02", SCHEMA, 4) as w:
        assert w.commit() == 0
    files = list(day_dir(tmp_path, "2024-01-02").glob("*.parquet"))
    assert len(files) == 1 and pq.read_schema(files[0]).field("x").type == pa.int64()


def _committed(tmp_path, rows=(0, 2)):
    with DayWriter(tmp_path, DAY, SCHEMA, 4) as w:
        w.write(_t(*rows))
        w.commit()


def _leftovers(root):
    return sorted(p.name for p in [*root.glob(".tmp-*"), *root.glob(".old-*")])


DAY = "2024-01-01"


@pytest.mark.parametrize("failing", ["part-00000.parquet", "part-00001.parquet"])
def test_disk_full_keeps_the_previous_day_and_names_the_file(tmp_path, monkeypatch, failing):
    _committed(tmp_path)
    seen = fill_parquet_writes(monkeypatch, lambda p: p.name == failing)
    with pytest.raises(DataError) as exc, DayWriter(tmp_path, DAY, SCHEMA, 4) as w:
        w.write(_t(10, 20))  # 3 files of 4 rows
        w.commit()
    assert str(exc.value) == f"'{tmp_path / f'.tmp-day={DAY}' / failing}': could not be written ({ENOSPC_REASON})"
    assert seen[-1].name == failing
    assert pq.read_table(day_dir(tmp_path, DAY)).column("x").to_pylist() == [0, 1]
    assert _leftovers(tmp_path) == []


def test_disk_full_when_the_footer_is_written(tmp_path, monkeypatch):
    _committed(tmp_path)
    real, failed = pq.ParquetWriter.close, []

    def close(self):  # the first close fails like a full disk; a later one (the writer's __del__) works
        if not failed:
            failed.append(self.where)
            raise OSError(errno.ENOSPC, ENOSPC_REASON)
        return real(self)

    monkeypatch.setattr(pq.ParquetWriter, "close", close)
    with pytest.raises(DataError, match=r"part-00000\.parquet': could not be written \(No space left on device\)"):
        with DayWriter(tmp_path, DAY, SCHEMA, 4) as w:
            w.write(_t(10, 12))
            w.commit()
    assert pq.read_table(day_dir(tmp_path, DAY)).column("x").to_pylist() == [0, 1]
    assert _leftovers(tmp_path) == [] and len(failed) == 1


def test_a_failed_rename_puts_the_previous_day_back(tmp_path, monkeypatch):
    _committed(tmp_path)
    real = Path.rename

    def rename(self, target):
        if self.name.startswith(".tmp-day="):
            raise OSError(errno.EIO, "Input/output error", str(self))
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(DataError, match=r"\.tmp-day=2024-01-01': could not be written \(Input/output error\)"):
        with DayWriter(tmp_path, DAY, SCHEMA, 4) as w:
            w.write(_t(10, 12))
            w.commit()
    assert pq.read_table(day_dir(tmp_path, DAY)).column("x").to_pylist() == [0, 1]
    assert _leftovers(tmp_path) == []


def test_a_commit_interrupted_between_its_renames_is_recovered(tmp_path):
    _committed(tmp_path)
    day_dir(tmp_path, DAY).rename(tmp_path / f".old-day={DAY}")  # killed after moving the old day aside
    with DayWriter(tmp_path, DAY, SCHEMA, 4):
        assert pq.read_table(day_dir(tmp_path, DAY)).column("x").to_pylist() == [0, 1]  # put back at once
    assert _leftovers(tmp_path) == [f".tmp-day={DAY}"]  # (the writer was neither committed nor aborted)
