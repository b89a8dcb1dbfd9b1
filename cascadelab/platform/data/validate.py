"""Full validation of a dataset's Parquet files: every row group decoded, ids and labels checked.

The training pipeline checks schemas before Ray starts and ids/labels batch by batch in the collate
(``ingest.ArrowToTorch``). This module reads whole files instead, so that

* a failed run can name the exact file behind a worker's error (``find_bad_file``: a day's files are
  scanned only after something went wrong), and
* ``data.skip_bad_files`` (``cascadelab train --skip-bad-files``) can drop bad files before training:
  ``validate_days`` checks every file of the planned days (as parallel Ray tasks when Ray is running)
  and returns the good ones plus a one-line reason per bad file. That costs one extra read of the data.

A file is bad when it cannot be opened or decoded (corrupt or truncated), lacks a column or has one of
another type, holds an id outside the vocabulary of ``dataset.json`` (or a negative id), or holds a NaN
or infinite label. Every reason names the file and the field. Ray is imported lazily, for the parallel check.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cascadelab.platform.data.schema import (
    ITEM_FIELDS,
    SEQ_FIELDS,
    USER_FIELDS,
    DataError,
    DatasetMeta,
    check_table_schema,
    day_dir,
    day_dir_files,
    id_high,
    id_range_error,
    label_error,
    projected_schema,
)

log = logging.getLogger(__name__)


@dataclass
class DayFiles:
    """The files of the planned days that passed validation, and why the others did not."""

    good: dict[str, list[str]] = field(default_factory=dict)  # day -> readable files, sorted
    bad: dict[str, str] = field(default_factory=dict)  # file -> one-line reason naming the field

    @property
    def skipped(self) -> int:
        return len(self.bad)


def _check_ids(path: str, values: np.ndarray, fields: tuple[str, ...], vocab: dict[str, int]) -> None:
    """``values``: [rows, len(fields)]; raise DataError on the first field with an id out of range."""
    if values.size == 0:
        return
    hi, lo = values.max(axis=0), values.min(axis=0)
    for i, name in enumerate(fields):
        top = id_high(vocab, name)
        if hi[i] > top or lo[i] < 0:
            raise id_range_error(f"'{path}'", name, int(hi[i]) if hi[i] > top else int(lo[i]), top)


def _flat(col: pa.ChunkedArray, width: int) -> np.ndarray:
    arr = col.combine_chunks()
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)


def check_file(path: str | Path, mode: str, groups: tuple[str, ...], vocab: dict[str, int]) -> str | None:
    """None when the file is good, else a one-line reason naming the file and the field."""
    path = str(path)
    expected = projected_schema(mode, groups)
    try:
        pf = pq.ParquetFile(path)
        check_table_schema(pf.schema_arrow, expected, path)
        for rg in range(pf.num_row_groups):
            table = pf.read_row_group(rg, columns=expected.names)
            users = np.stack([table.column(f).to_numpy() for f in USER_FIELDS], axis=1)
            _check_ids(path, users, USER_FIELDS, vocab)
            _check_ids(path, _flat(table.column("seq_items"), len(SEQ_FIELDS)), SEQ_FIELDS, vocab)
            for g in groups:
                _check_ids(path, _flat(table.column(f"{g}_items"), len(ITEM_FIELDS)), ITEM_FIELDS, vocab)
                labels = _flat(table.column(f"{g}_label"), 1)
                if not np.isfinite(labels).all():
                    raise label_error(f"'{path}'", f"{g}_label")
    except DataError as exc:
        return str(exc)
    except (pa.ArrowException, OSError, ValueError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        return f"'{path}': not a readable Parquet file ({first})"
    return None


def validate_days(root: str | Path, days: list[str], meta: DatasetMeta, groups: tuple[str, ...],
                  parallel: bool | None = None) -> DayFiles:
    """Check every file of ``days``; a missing day, or a day left with no good file, raises DataError.

    ``parallel`` (default: when Ray is initialised) runs one Ray task per file.
    """
    files = {day: day_dir_files(root, day) for day in days}
    flat = [(day, f) for day in days for f in files[day]]
    if parallel is None:
        import ray

        parallel = ray.is_initialized()
    if parallel:
        import ray

        task = ray.remote(num_cpus=1)(check_file)
        reasons = ray.get([task.remote(f, meta.mode, groups, meta.vocab) for _, f in flat])
    else:
        reasons = [check_file(f, meta.mode, groups, meta.vocab) for _, f in flat]
    out = DayFiles()
    for (day, f), reason in zip(flat, reasons, strict=True):
        if reason is None:
            out.good.setdefault(day, []).append(f)
        else:
            out.bad[f] = reason
            log.warning("skipping bad file: %s", reason)
    for day in days:
        if not out.good.get(day):
            raise DataError(f"day '{day}': all {len(files[day])} file(s) in '{day_dir(root, day)}' are bad "
                            f"(first: {out.bad[files[day][0]]})")
    return out


def find_bad_file(root: str | Path, days: list[str], meta: DatasetMeta, groups: tuple[str, ...],
                  ignore: set[str] | frozenset[str] = frozenset()) -> str | None:
    """The reason for the first bad file of ``days`` (in order, files in ``ignore`` left out), or None."""
    for day in days:
        try:
            files = day_dir_files(root, day)
        except DataError as exc:
            return str(exc)
        for f in files:
            if f in ignore:
                continue
            reason = check_file(f, meta.mode, groups, meta.vocab)
            if reason is not None:
                return reason
    return None
