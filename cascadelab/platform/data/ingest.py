"""Ray Data ingest: datasets of days with column projection, collated to torch without copies.

``read_day`` (one day) and ``read_days`` (several days as one dataset, each row with the path of its
file, so that a reader of the stream knows each row's day: :func:`split_by_day`) check the days' files
before any Ray work (a missing directory, a day with no files, a missing column or a wrong list length
each stop with one line naming the file and the column).
``ArrowToTorch`` turns an Arrow batch into the tensors of a ``CascadeBatch``: the fixed-size list
columns are reinterpreted as ``[B, slots, fields]`` views of the Arrow buffers; only the concatenation
of the candidate groups copies. ``ray.data`` is imported lazily, by the function that builds a dataset.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from ray.data.collate_fn import ArrowBatchCollateFn

from cascadelab.cascade.batch import CascadeBatch
from cascadelab.cascade.negatives import sample_in_batch_negatives
from cascadelab.platform.data.schema import (
    ITEM_FIELDS,
    SEQ_FIELDS,
    SEQ_LEN,
    SLOTS,
    USER_FIELDS,
    DatasetMeta,
    columns_for,
    day_files,
    id_high,
    id_range_error,
    label_error,
)


def read_day(root: str | Path, day: str, meta: DatasetMeta, groups: tuple[str, ...],
             max_rows: int | None = None, files: list[str] | None = None, reader: str = "auto"):
    """A Ray Dataset of one day, projected to the columns a cascade over ``groups`` needs.

    ``files``: the day's files to read (e.g. those that passed ``validate.validate_days``); default: all,
    after a schema check. ``reader``: Ray Data's Parquet reader (``data.parquet_reader``), see
    :func:`pick_reader`. The choice is made per ``read_parquet`` call (``DataContext.use_datasource_v2``
    at planning time) and the context is restored afterwards.
    """
    import ray.data
    from ray.data import DataContext

    if files is None:
        files = day_files(root, day, meta.mode, groups)
    ctx = DataContext.get_current()
    previous, ctx.use_datasource_v2 = ctx.use_datasource_v2, pick_reader(files, reader) == "v2"
    try:
        ds = ray.data.read_parquet(files, columns=columns_for(groups), partitioning=None)
    finally:
        ctx.use_datasource_v2 = previous
    if max_rows is not None:
        ds = ds.limit(max_rows)
    return ds


def read_days(root: str | Path, days: list[str], meta: DatasetMeta, groups: tuple[str, ...],
              files: dict[str, list[str]] | None = None, reader: str = "auto"):
    """One Ray Dataset of ``days`` in the order given (each day's files in order; read it with
    ``preserve_order``), projected like :func:`read_day`, plus the column ``PATH_COLUMN``: each row's
    file. ``files``: each day's files to read (default: all, after a schema check)."""
    import ray.data
    from ray.data import DataContext

    paths = [f for day in days for f in (files[day] if files is not None else day_files(root, day, meta.mode, groups))]
    ctx = DataContext.get_current()
    previous, ctx.use_datasource_v2 = ctx.use_datasource_v2, pick_reader(paths, reader) == "v2"
    try:
        return ray.data.read_parquet(paths, columns=columns_for(groups), partitioning=None, include_paths=True)
    finally:
        ctx.use_datasource_v2 = previous


PATH_COLUMN = "path"  # what read_parquet(include_paths=True) names it


def day_of_path(path: str) -> str:
    """The day of a file under ``DIR/day=YYYY-MM-DD/`` (a local path or a URI)."""
    return Path(path).parent.name.removeprefix("day=")


def split_by_day(table: pa.Table, day_index: dict[str, int]) -> list[tuple[int, pa.Table]]:
    """A batch of :func:`read_days`'s stream as its consecutive runs of one day: ``[(index of the day in
    day_index, rows without the path column), ...]`` in row order."""
    if table.num_rows == 0:
        return []
    paths = table.column(PATH_COLUMN).combine_chunks().dictionary_encode()
    of_path = np.array([day_index[day_of_path(p)] for p in paths.dictionary.to_pylist()], dtype=np.int64)
    day = of_path[paths.indices.to_numpy(zero_copy_only=False)]
    cuts = [0, *(np.flatnonzero(np.diff(day)) + 1).tolist(), table.num_rows]
    rows = table.drop_columns([PATH_COLUMN])
    return [(int(day[a]), rows.slice(a, b - a)) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


V2_MIN_BYTES = 64 << 20


def pick_reader(files: list[str], reader: str = "auto") -> str:
    """"v1" or "v2" for a dataset's files; "auto": v1 below ``V2_MIN_BYTES`` of Parquet, else v2.

    Even with an explicit file list, Ray 2.60's v2 reader runs a ListFiles task and provisions footer
    readers for each dataset (a run reads one for its training days and one for its evaluation day): a
    fixed start-up cost, which v1 does not pay and which dominates small data; on large days v2 streams
    faster per Train worker (``cascadelab bench ingest`` measures both). Sizes that cannot be read
    (remote paths) count as large.
    """
    if reader != "auto":
        return reader
    total = 0
    for f in files:
        try:
            total += os.path.getsize(f)
        except OSError:
            return "v2"
        if total >= V2_MIN_BYTES:
            return "v2"
    return "v1"


def _fsl_view(col: pa.ChunkedArray | pa.Array, width: int) -> np.ndarray:
    """A fixed-size list column as a ``[rows, width]`` numpy view of its values (no copy for one chunk)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    flat = arr.flatten()  # honours the slice offset, unlike .values
    return flat.to_numpy(zero_copy_only=False).reshape(-1, width)


def _tensor(x: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():  # Arrow buffers are read-only; we never write to them
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(x)


def arrow_to_tensors(table: pa.Table, groups: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """``pa.Table`` batch -> tensors of a ``CascadeBatch`` (see cascadelab.cascade.batch)."""
    user = np.stack([table.column(f).to_numpy() for f in USER_FIELDS], axis=1)
    seq = _tensor(_fsl_view(table.column("seq_items"), SEQ_LEN * len(SEQ_FIELDS))).view(-1, SEQ_LEN,
                                                                                           len(SEQ_FIELDS))
    seq_mask = _tensor(_fsl_view(table.column("seq_mask"), SEQ_LEN)).bool()
    items = [_tensor(_fsl_view(table.column(f"{g}_items"), SLOTS * len(ITEM_FIELDS))).view(
        -1, SLOTS, len(ITEM_FIELDS)) for g in groups]
    masks = [_tensor(_fsl_view(table.column(f"{g}_mask"), SLOTS)) for g in groups]
    labels = [_tensor(_fsl_view(table.column(f"{g}_label"), SLOTS)) for g in groups]
    return {
        "user": torch.from_numpy(user),
        "seq": seq,
        "seq_mask": seq_mask,
        "items": torch.cat(items, dim=1),
        "mask": torch.cat(masks, dim=1).bool(),
        "label": torch.cat(labels, dim=1),
    }


def _highs(vocab: dict[str, int], fields: tuple[str, ...]) -> torch.Tensor:
    """Largest valid stored id per field (ids are 1..V, 0 = padding)."""
    return torch.tensor([id_high(vocab, f) for f in fields], dtype=torch.int64)


def check_tensors(tensors: dict[str, torch.Tensor], vocab: dict[str, int], source: str) -> None:
    """Stop on ids outside the vocabulary or non-finite labels, naming ``source`` and the field."""
    for key, fields in (("user", USER_FIELDS), ("items", ITEM_FIELDS), ("seq", SEQ_FIELDS)):
        x = tensors[key].reshape(-1, len(fields))
        if x.numel() == 0:
            continue
        hi, lo, top = x.max(0).values, x.min(0).values, _highs(vocab, fields)
        bad = (hi > top) | (lo < 0)
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise id_range_error(source, fields[i], int(hi[i]) if hi[i] > top[i] else int(lo[i]), int(top[i]))
    if not torch.isfinite(tensors["label"]).all():
        raise label_error(source, "<group>_label")


class ArrowToTorch(ArrowBatchCollateFn):
    """Ray Data collate: Arrow batch -> ``dict`` of CPU tensors (Ray moves them to the device).

    With ``vocab`` every batch is checked (ids within the vocabulary, finite labels); an error names
    ``source`` (the day's directory) and the field.

    ``sample_num > 0`` appends that many in-batch negatives per request (valid candidates of other
    requests, label 0; see ``cascadelab.cascade.negatives``), drawn with a generator seeded by ``seed``.
    """

    def __init__(self, groups: tuple[str, ...], sample_num: int = 0, seed: int = 0,
                 vocab: dict[str, int] | None = None, source: str = "data"):
        super().__init__()
        self.groups = tuple(groups)
        self.sample_num = sample_num
        self.seed = seed
        self.vocab = vocab
        self.source = source
        self._generator: torch.Generator | None = None

    def __call__(self, batch: pa.Table) -> dict[str, torch.Tensor]:
        tensors = arrow_to_tensors(batch, self.groups)
        if self.vocab is not None:
            check_tensors(tensors, self.vocab, self.source)
        if self.sample_num <= 0:
            return tensors
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.seed)
        grown = sample_in_batch_negatives(CascadeBatch.from_dict(tensors), self.sample_num, self._generator)
        return {"user": grown.user, "seq": grown.seq, "seq_mask": grown.seq_mask, "items": grown.items,
                "mask": grown.mask, "label": grown.label}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_generator": None}  # generators do not pickle; re-seeded per process
