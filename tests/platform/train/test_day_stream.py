"""The run's one training stream split into days without Ray: day runs from the file paths, each worker's
share of each day, batches that never mix days, the batches a prefetching thread hands over."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from cascadelab.platform.data.ingest import PATH_COLUMN, day_of_path, split_by_day
from cascadelab.platform.train.loop import DayBatcher, prefetched

DAYS = {"2024-01-13": 0, "2024-01-14": 1, "2024-01-15": 2}


def _stream(rows_per_day: list[int], chunk: int) -> list[pa.Table]:
    """Tables of ``chunk`` rows (crossing day boundaries) over days of ``rows_per_day``: ``day``, ``i``
    (the row's index in its day) and the path column as read_parquet(include_paths=True) gives it."""
    day, i, path = [], [], []
    for d, n in enumerate(rows_per_day):
        day += [d] * n
        i += list(range(n))
        path += [f"/data/ds/day={list(DAYS)[d]}/part-{k // 5:05d}.parquet" for k in range(n)]
    table = pa.table({"day": day, "i": i, PATH_COLUMN: path})
    return [table.slice(a, chunk) for a in range(0, table.num_rows, chunk)]


def _runs(tables):
    return [run for t in tables for run in split_by_day(t, DAYS)]


def test_a_batch_splits_into_runs_of_one_day_without_the_path_column():
    assert day_of_path("s3://bucket/ds/day=2024-01-14/part-00000.parquet") == "2024-01-14"
    (table,) = _stream([3, 4, 2], chunk=9)
    runs = split_by_day(table, DAYS)
    assert [(d, t.num_rows) for d, t in runs] == [(0, 3), (1, 4), (2, 2)]
    assert all(t.column_names == ["day", "i"] and set(t.column("day").to_pylist()) == {d} for d, t in runs)
    assert split_by_day(table.slice(0, 0), DAYS) == []


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_one_worker_gets_every_row_in_order_in_batches_that_never_mix_days(chunk):
    batches = list(DayBatcher([10, 7, 12], batch_size=4).batches(_runs(_stream([10, 7, 12], chunk))))
    assert [(d, t.num_rows) for d, t in batches] == [(0, 4), (0, 4), (0, 2), (1, 4), (1, 3), (2, 4), (2, 4), (2, 4)]
    for d, t in batches:
        assert set(t.column("day").to_pylist()) == {d}
    assert [i for d, t in batches if d == 1 for i in t.column("i").to_pylist()] == list(range(7))


@pytest.mark.parametrize("world", [2, 3])
def test_workers_share_each_day_equally_and_disjointly_within_its_cap(world):
    rows, cap = [10, 7, 12], [10, 7, 9]  # the third day capped at 9 rows
    shares = []
    for rank in range(world):
        batcher = DayBatcher(cap, batch_size=2, rank=rank, world=world)
        shares.append(list(batcher.batches(_runs(_stream(rows, 5)))))
    for d in range(3):
        per_rank = [[i for day, t in share if day == d for i in t.column("i").to_pylist()] for share in shares]
        assert len({len(p) for p in per_rank}) == 1  # same rows, so the same number of batches, on every rank
        assert len({sum(1 for day, _ in share if day == d) for share in shares}) == 1
        got = sorted(i for p in per_rank for i in p)
        assert got == list(range(cap[d] // world * world))  # every kept row once; the remainder dropped


def test_shuffled_windows_are_deterministic_and_keep_each_day_whole():
    def order(seed):
        batcher = DayBatcher([10, 7, 12], batch_size=3, shuffle_rows=5, seed=seed)
        return [(d, t.column("i").to_pylist()) for d, t in batcher.batches(_runs(_stream([10, 7, 12], 4)))]

    a = order(0)
    assert a == order(0) and a != order(1)
    for d, n in enumerate([10, 7, 12]):
        rows = [i for day, ids in a if day == d for i in ids]
        assert sorted(rows) == list(range(n)) and rows != list(range(n))
    assert all(len(ids) == 3 for day, ids in a[:3])


def test_prefetched_hands_over_every_item_in_order_then_the_producers_error():
    assert list(prefetched(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield from range(3)
        raise OSError("page checksum")

    it = prefetched(failing())
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(OSError, match="page checksum"):
        next(it)


def test_the_batches_of_a_day_are_the_rows_a_day_by_day_read_gives():
    """Against the plain reference: each day read alone, sliced into batches."""
    rows = [9, 4, 11]
    got = list(DayBatcher(rows, batch_size=4).batches(_runs(_stream(rows, 6))))
    expected = []
    for d, n in enumerate(rows):
        ids = np.arange(n)
        expected += [(d, ids[a:a + 4].tolist()) for a in range(0, n, 4)]
    assert [(d, t.column("i").to_pylist()) for d, t in got] == expected


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_the_one_pipeline_gives_the_batches_of_one_read_per_day(tiny_dataset, ray_local):
    """Real Ray Data: the training days read as one dataset and cut by DayBatcher give, day by day, the
    tensors that reading each day alone in batches gives (same rows, same order, same negatives), with the
    run's ``preserve_order``."""
    from ray.data import DataContext

    from cascadelab.platform.data.schema import DatasetMeta, groups_for

    meta, groups = DatasetMeta.read(tiny_dataset), groups_for("two_stage")
    options = DataContext.get_current().execution_options
    kept, options.preserve_order = options.preserve_order, True  # as the run reads them
    try:
        _compare_with_one_read_per_day(tiny_dataset, meta, groups, sorted(meta.days)[:2])
    finally:
        options.preserve_order = kept


def _compare_with_one_read_per_day(tiny_dataset, meta, groups, days):
    import torch

    from cascadelab.platform.data.ingest import ArrowToTorch, read_day, read_days

    stream = read_days(tiny_dataset, days, meta, groups).iter_batches(batch_size=50, batch_format="pyarrow")
    batcher = DayBatcher([meta.rows_per_day[d] for d in days], batch_size=64)
    index = {day: i for i, day in enumerate(days)}
    got = {d: [] for d in range(len(days))}
    collates = {d: ArrowToTorch(groups, sample_num=4, seed=7, vocab=meta.vocab) for d in got}
    for d, table in batcher.batches(run for t in stream for run in split_by_day(t, index)):
        got[d].append(collates[d](table))
    for d, day in enumerate(days):
        ref = read_day(tiny_dataset, day, meta, groups).iter_torch_batches(
            batch_size=64, collate_fn=ArrowToTorch(groups, sample_num=4, seed=7, vocab=meta.vocab))
        expected = list(ref)
        assert len(got[d]) == len(expected) == 3
        for mine, theirs in zip(got[d], expected, strict=True):
            assert mine.keys() == theirs.keys()
            assert all(torch.equal(mine[k], theirs[k]) for k in mine)
