"""A worker's data failure travels as a typed ShardError; the driver turns it into one line naming the file."""

from __future__ import annotations

import pickle
import shutil

import pytest

from cascadelab.platform.config import load_config
from cascadelab.platform.data.schema import DataError
from cascadelab.platform.train.loop import ShardError, read_shard
from cascadelab.platform.train.plan import plan_run
from cascadelab.platform.train.run import data_failure, worker_failure


def test_shard_error_keeps_its_fields_through_pickling():
    err = pickle.loads(pickle.dumps(ShardError("2024-01-13", "bad id", checked=True)))
    assert (type(err), err.day, err.message, err.checked, str(err)) == (ShardError, "2024-01-13", "bad id", True,
                                                                       "bad id")
    assert isinstance(err, DataError)


def test_a_data_check_is_found_through_wrappers_and_a_read_failure_is_not_one():
    try:
        try:
            raise DataError("day 'd': field 'author_id' has id 7 outside the vocabulary")
        except DataError as inner:
            raise RuntimeError("the iterator's own wrapper") from inner
    except RuntimeError as outer:
        checked = ShardError.from_failure("d", outer)
    assert checked.checked and checked.message == "day 'd': field 'author_id' has id 7 outside the vocabulary"
    read = ShardError.from_failure("d", OSError("Couldn't deserialize thrift\nmore"))
    assert not read.checked and read.message == "reading day 'd' failed: OSError: Couldn't deserialize thrift"


def test_read_shard_wraps_failures_of_the_iterator_only():
    def batches():
        yield 1
        yield 2
        raise OSError("page checksum")

    it = read_shard(batches(), "2024-01-14")
    assert [next(it), next(it)] == [1, 2]
    with pytest.raises(ShardError) as exc:
        next(it)
    assert exc.value.day == "2024-01-14" and isinstance(exc.value.__cause__, OSError)
    with pytest.raises(ZeroDivisionError):  # a failure of the loop body is not the data's
        for _ in read_shard(iter([1]), "d"):
            raise ZeroDivisionError


def test_the_driver_unwraps_ray_trains_worker_group_error():
    import ray.train

    mine = ShardError("2024-01-14", "x", checked=False)
    group = ray.train.WorkerGroupError("rank 1 failed", {0: RuntimeError("other"), 1: mine})
    assert worker_failure(group) is mine
    assert worker_failure(ray.train.WorkerGroupError("x", {0: RuntimeError("other")})) is None
    assert worker_failure(RuntimeError("not from Train")) is None
    assert worker_failure(mine) is mine  # raised on the driver while planning a dataset


@pytest.fixture
def broken(tiny_dataset, tmp_path):
    """A copy of the tiny dataset whose second training day's file has zeroed data pages (footer intact)."""
    root = tmp_path / "ds"
    shutil.copytree(tiny_dataset, root)
    path = sorted((root / "day=2024-01-14").glob("*.parquet"))[0]
    data = bytearray(path.read_bytes())
    data[300:5000] = bytes(4700)
    path.write_bytes(bytes(data))
    return root, path


def test_a_read_failure_is_named_by_the_bad_file(broken, tmp_path):
    root, path = broken
    plan = plan_run(load_config(None, {"data": {"path": str(root)}, "train": {"storage_path": str(tmp_path)}}))
    bad = data_failure(ShardError("2024-01-14", "reading day failed", checked=False), plan, None)
    assert isinstance(bad, DataError) and str(bad).startswith(f"'{path}': not a readable Parquet file")


def test_a_failure_without_a_bad_file_stays_what_it_was(tiny_dataset, tmp_path):
    plan = plan_run(load_config(None, {"data": {"path": str(tiny_dataset)}, "train": {"storage_path": str(tmp_path)}}))
    assert data_failure(ShardError("2024-01-14", "reading day failed", checked=False), plan, None) is None
    checked = data_failure(ShardError("2024-01-14", "day '2024-01-14': a bad label", checked=True), plan, None)
    assert str(checked) == "day '2024-01-14': a bad label"
    assert data_failure(RuntimeError("injected failure"), plan, None) is None
