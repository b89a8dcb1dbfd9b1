import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cascadelab.cascade import batch
from cascadelab.platform.data import schema
from cascadelab.platform.data.ingest import arrow_to_tensors, day_files
from cascadelab.platform.data.schema import GROUPS_TWO_STAGE, DataError, DatasetMeta, day_dir
from cascadelab.platform.data.synthetic import SyntheticConfig, generate


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("schema") / "ds"
    generate(SyntheticConfig(days=2, requests_per_day=50, seed=2), root)
    return root


def test_round_trip_arrow_to_tensors(ds):
    table = pq.read_table(day_files(ds, "2024-01-13", "two_stage", GROUPS_TWO_STAGE)[0])
    part = table.slice(7, 20)  # a slice with an offset: the views must honour it
    t = arrow_to_tensors(part, GROUPS_TWO_STAGE)
    assert t["user"].shape == (20, 8) and t["seq"].shape == (20, 50, 5)
    assert t["items"].shape == (20, 40, 8) and t["mask"].shape == (20, 40) and t["mask"].dtype == torch.bool
    assert t["user"][0, 0] == part.column("user_id")[0].as_py()
    row = part.slice(3, 1)
    coarse = np.array(row.column("coarse_neg_items")[0].as_py()).reshape(10, 8)
    assert torch.equal(t["items"][3, 20:30], torch.from_numpy(coarse))
    assert t["label"][3, :10].tolist() == row.column("rank_pos_label")[0].as_py()
    seq = np.array(row.column("seq_items")[0].as_py()).reshape(50, 5)
    assert torch.equal(t["seq"][3], torch.from_numpy(seq))


def test_missing_directory_and_metadata(tmp_path, ds):
    with pytest.raises(DataError, match="data directory '.*nowhere' does not exist"):
        DatasetMeta.read(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="dataset.json' is missing"):
        DatasetMeta.read(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "dataset.json").write_text(json.dumps({"mode": "two_stage", "color": 1}))
    with pytest.raises(DataError, match=r"unknown field\(s\) \['color'\]"):
        DatasetMeta.read(bad)


def test_day_errors_name_the_path(tmp_path, ds):
    with pytest.raises(DataError, match="day '2030-01-01': directory .* does not exist"):
        day_files(ds, "2030-01-01", "two_stage", GROUPS_TWO_STAGE)
    day_dir(tmp_path, "2024-01-01").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no \*.parquet files in"):
        day_files(tmp_path, "2024-01-01", "two_stage", GROUPS_TWO_STAGE)


def _rewrite(src_root, dst_root, fn):
    src = sorted(day_dir(src_root, "2024-01-13").glob("*.parquet"))[0]
    d = day_dir(dst_root, "2024-01-13")
    d.mkdir(parents=True)
    out = d / "part-00000.parquet"
    pq.write_table(fn(pq.read_table(src)), out)
    return out


def test_schema_mismatch_names_file_and_column(tmp_path, ds):
    out = _rewrite(ds, tmp_path / "a", lambda t: t.drop_columns(["seq_mask"]))
    with pytest.raises(DataError, match=f"'{out}': missing column 'seq_mask'"):
        day_files(tmp_path / "a", "2024-01-13", "two_stage", GROUPS_TWO_STAGE)

    def shorter(t):
        short = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(t.num_rows * 9, dtype=np.int8)), 9)
        return t.set_column(t.schema.get_field_index("rank_neg_mask"), "rank_neg_mask", short)

    out = _rewrite(ds, tmp_path / "b", shorter)
    expected = r"column 'rank_neg_mask' has type fixed_size_list<.*: int8>\[9\], expected .*\[10\]"
    with pytest.raises(DataError, match=expected):
        day_files(tmp_path / "b", "2024-01-13", "two_stage", GROUPS_TWO_STAGE)


def test_corrupt_file_is_named(tmp_path, ds):
    d = day_dir(tmp_path, "2024-01-13")
    d.mkdir(parents=True)
    (d / "part-00000.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        day_files(tmp_path, "2024-01-13", "two_stage", GROUPS_TWO_STAGE)


def test_the_parquet_columns_store_the_batch_feature_fields():
    for name in ("SEQ_FIELDS", "ITEM_FIELDS", "USER_FIELDS", "TIME_VOCAB"):
        assert getattr(schema, name) is getattr(batch, name)  # one definition
    arrow = schema.arrow_schema("two_stage")
    assert arrow.field("seq_items").type.list_size == schema.SEQ_LEN * len(batch.SEQ_FIELDS)
    assert arrow.field("rank_pos_items").type.list_size == schema.SLOTS * len(batch.ITEM_FIELDS)
    assert set(batch.USER_FIELDS) <= set(schema.REQUEST_FIELDS)
