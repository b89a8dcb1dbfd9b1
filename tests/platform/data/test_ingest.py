import pickle

import pyarrow.parquet as pq
import pytest
import torch

from cascadelab.platform.data.ingest import ArrowToTorch, day_files
from cascadelab.platform.data.schema import GROUPS_TWO_STAGE, DataError, DatasetMeta
from cascadelab.platform.data.synthetic import SyntheticConfig, generate


@pytest.fixture(scope="module")
def table_and_meta(tmp_path_factory):
    root = tmp_path_factory.mktemp("ingest") / "ds"
    meta = generate(SyntheticConfig(days=1, requests_per_day=40, seed=5), root)
    table = pq.read_table(day_files(root, meta.days[0], meta.mode, GROUPS_TWO_STAGE)[0])
    return table, DatasetMeta.read(root)


def test_collate_appends_in_batch_negatives(table_and_meta):
    table, meta = table_and_meta
    collate = ArrowToTorch(GROUPS_TWO_STAGE, sample_num=7, seed=1, vocab=meta.vocab, source="day x")
    out = collate(table.slice(0, 16))
    assert out["items"].shape == (16, 47, 8) and out["mask"].shape == (16, 47)
    assert out["mask"][:, 40:].all() and (out["label"][:, 40:] == 0).all()
    again = pickle.loads(pickle.dumps(collate))(table.slice(0, 16))  # pickles for Ray, reseeds
    assert torch.equal(again["items"], ArrowToTorch(GROUPS_TWO_STAGE, 7, seed=1)(table.slice(0, 16))["items"])


def test_ids_outside_vocabulary_are_named(table_and_meta):
    table, meta = table_and_meta
    small = {**meta.vocab, "author_id": 3}
    with pytest.raises(DataError, match=r"field 'author_id' has id \d+ outside the vocabulary \(expected 0..3"):
        ArrowToTorch(GROUPS_TWO_STAGE, vocab=small, source="day 'D'")(table.slice(0, 8))


def test_nan_label_is_named(table_and_meta):
    import numpy as np
    import pyarrow as pa

    table, meta = table_and_meta
    labels = np.stack(table.column("rank_neg_label").to_numpy(zero_copy_only=False)).astype(np.float32)
    labels[2, 3] = np.nan
    col = pa.FixedSizeListArray.from_arrays(pa.array(labels.reshape(-1)), 10)
    bad = table.set_column(table.schema.get_field_index("rank_neg_label"), "rank_neg_label", col)
    with pytest.raises(DataError, match="day 'D': field '<group>_label' holds NaN"):
        ArrowToTorch(GROUPS_TWO_STAGE, vocab=meta.vocab, source="day 'D'")(bad.slice(0, 8))


def test_pick_reader_by_day_size(tmp_path, monkeypatch):
    from cascadelab.platform.data import ingest

    files = []
    for i in range(3):
        f = tmp_path / f"part-{i}.parquet"
        f.write_bytes(b"x" * 1000)
        files.append(str(f))
    assert ingest.pick_reader(files) == "v1"  # tiny day: v2's per-dataset start-up would dominate
    monkeypatch.setattr(ingest, "V2_MIN_BYTES", 2500)
    assert ingest.pick_reader(files) == "v2"
    assert ingest.pick_reader(files, "v1") == "v1" and ingest.pick_reader(files[:1], "v2") == "v2"
    assert ingest.pick_reader([str(tmp_path / "elsewhere.parquet")]) == "v2"  # size unknown: large
