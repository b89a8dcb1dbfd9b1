"""Whole-file validation: every kind of bad file is found and named with its field (no Ray)."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cascadelab.platform.data.schema import GROUPS_TWO_STAGE, DataError, DatasetMeta, day_dir
from cascadelab.platform.data.synthetic import SyntheticConfig, generate
from cascadelab.platform.data.validate import check_file, find_bad_file, validate_days

DAY = "2024-01-13"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("validate") / "ds"
    generate(SyntheticConfig(days=2, requests_per_day=64, rows_per_file=32, seed=3), root)
    return root


@pytest.fixture
def ds(source, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(source, root)
    return root


def _part(root, i=1):
    return day_dir(root, DAY) / f"part-{i:05d}.parquet"


def _set(path, name, values, width):
    table = pq.read_table(path)
    col = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), width)
    pq.write_table(table.set_column(table.schema.get_field_index(name), name, col), path)


def _check(root, path):
    return check_file(path, "two_stage", GROUPS_TWO_STAGE, DatasetMeta.read(root).vocab)


def test_good_files_pass(ds):
    meta = DatasetMeta.read(ds)
    out = validate_days(ds, meta.days, meta, GROUPS_TWO_STAGE, parallel=False)
    assert out.skipped == 0 and [len(out.good[d]) for d in meta.days] == [2, 2]


def test_truncated_file(ds):
    p = _part(ds)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    assert _check(ds, p).startswith(f"'{p}': not a readable Parquet file (")


def test_corrupt_page_inside_a_valid_footer(ds):
    p = _part(ds)
    data = bytearray(p.read_bytes())
    data[200:4000] = bytes(3800)  # column chunk bytes overwritten; footer intact
    p.write_bytes(bytes(data))
    assert pq.read_schema(p)  # the schema check before training cannot see this
    reason = _check(ds, p)
    assert reason is not None and reason.startswith(f"'{p}'")


def test_id_outside_vocabulary_names_file_and_field(ds):
    p = _part(ds)
    items = np.stack(pq.read_table(p).column("coarse_neg_items").to_numpy(zero_copy_only=False)).reshape(-1, 10, 8)
    items[3, 2, 1] = 10**6  # author_id
    _set(p, "coarse_neg_items", items, 80)
    assert _check(ds, p) == (f"'{p}': field 'author_id' has id 1000000 outside the vocabulary "
                             f"(expected 0..800; see 'vocab' in dataset.json)")


def test_nan_label_names_file_and_field(ds):
    p = _part(ds)
    labels = np.stack(pq.read_table(p).column("rank_pos_label").to_numpy(zero_copy_only=False)).astype(np.float32)
    labels[0, 0] = np.nan
    _set(p, "rank_pos_label", labels, 10)
    assert _check(ds, p) == f"'{p}': field 'rank_pos_label' holds NaN or inf (expected finite graded labels)"


def test_missing_column(ds):
    p = _part(ds)
    pq.write_table(pq.read_table(p).drop_columns(["seq_mask"]), p)
    assert _check(ds, p).startswith(f"'{p}': missing column 'seq_mask'")


def test_validate_days_skips_and_counts(ds):
    meta = DatasetMeta.read(ds)
    bad = _part(ds)
    bad.write_bytes(b"PAR1 not parquet")
    out = validate_days(ds, meta.days, meta, GROUPS_TWO_STAGE, parallel=False)
    assert out.skipped == 1 and list(out.bad) == [str(bad)]
    assert out.good[DAY] == [str(_part(ds, 0))]
    assert find_bad_file(ds, meta.days, meta, GROUPS_TWO_STAGE) == out.bad[str(bad)]
    assert find_bad_file(ds, meta.days, meta, GROUPS_TWO_STAGE, ignore={str(bad)}) is None


def test_a_day_with_no_good_file_stops(ds):
    meta = DatasetMeta.read(ds)
    for i in (0, 1):
        _part(ds, i).write_bytes(b"junk")
    with pytest.raises(DataError, match=f"day '{DAY}': all 2 file\\(s\\) in .* are bad"):
        validate_days(ds, meta.days, meta, GROUPS_TWO_STAGE, parallel=False)


def test_missing_day_stops(ds):
    meta = DatasetMeta.read(ds)
    shutil.rmtree(day_dir(ds, DAY))
    with pytest.raises(DataError, match=f"day '{DAY}': directory .* does not exist"):
        validate_days(ds, meta.days, meta, GROUPS_TWO_STAGE, parallel=False)
