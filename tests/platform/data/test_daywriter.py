from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cascadelab.platform.data.daywriter import DayWriter
from cascadelab.platform.data.schema import day_dir

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
