"""Atomic writes of the dataset: a day streamed into a temporary directory then renamed, or a whole
dataset directory written beside its target then swapped in.

Invariant of both: a reader never sees a half-written day or dataset. Until the final rename the output
lives under a name no reader opens (``.tmp-day=D`` inside the dataset, ``.<name>.tmp-*`` beside it); a
failure deletes it and leaves the previous version; a previous version is renamed aside (``.old-``) and
deleted only after the new one is in place. A failed write is a DataError naming the file.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cascadelab.platform.data.schema import day_dir, write_error


def _swap_in(new: Path, target: Path, old: Path) -> None:
    """Rename ``new`` to ``target``; an existing ``target`` goes to ``old`` first, is put back if the
    rename fails, and is deleted once ``new`` is in place."""
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        target.rename(old)
    try:
        new.rename(target)
    except OSError:
        if old.exists() and not target.exists():
            old.rename(target)
        raise
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


class DayWriter:
    """Streams tables of one day into ``part-NNNNN.parquet`` files of ``rows_per_file`` rows each.

    Files go to ``<root>/.tmp-day=D``; :meth:`commit` moves the directory to ``<root>/day=D`` (see
    :func:`_swap_in`; a ``.old-day=D`` left by an interrupted commit is the previous complete day and is put
    back when no ``day=D`` exists). Used as a context manager, an exception removes the temporary
    directory and leaves any existing day untouched. Memory: one written table at a time.
    """

    def __init__(self, root: str | Path, day: str, schema: pa.Schema, rows_per_file: int):
        if rows_per_file <= 0:
            raise ValueError(f"rows_per_file: expected a positive number of rows, got {rows_per_file}")
        self.root, self.day, self.schema, self.rows_per_file = Path(root), day, schema, rows_per_file
        self.tmp = self.root / f".tmp-day={day}"
        self.old = self.root / f".old-day={day}"
        final = day_dir(self.root, day)
        try:
            if self.old.is_dir() and not final.exists():
                self.old.rename(final)
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.mkdir(parents=True)
        except OSError as exc:
            raise write_error(self.tmp, exc) from None
        self.rows = 0
        self._files = 0
        self._writer: pq.ParquetWriter | None = None
        self._path: Path | None = None
        self._in_file = 0

    def write(self, table: pa.Table) -> None:
        table = table.cast(self.schema) if table.schema != self.schema else table
        start = 0
        while start < table.num_rows:
            take = min(self.rows_per_file - self._in_file, table.num_rows - start)
            self._append(table.slice(start, take))
            start += take
            if self._in_file == self.rows_per_file:
                self._close_file()

    def _append(self, part: pa.Table) -> None:
        """Append ``part`` to the open file, opening the next one first when none is open."""
        try:
            if self._writer is None:
                self._path = self.tmp / f"part-{self._files:05d}.parquet"
                self._writer = pq.ParquetWriter(self._path, self.schema)
                self._files += 1
                self._in_file = 0
            self._writer.write_table(part)
        except OSError as exc:
            raise write_error(self._path, exc) from None
        self._in_file += part.num_rows
        self.rows += part.num_rows

    def _close_file(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            try:
                writer.close()  # writes the footer: can fail on a full disk too
            except OSError as exc:
                raise write_error(self._path, exc) from None

    def commit(self) -> int:
        """Close the last file and put the day in place; returns the number of rows written."""
        self._close_file()
        try:
            if self._files == 0:  # an empty day still gets one (empty) file with the schema
                pq.write_table(self.schema.empty_table(), self.tmp / "part-00000.parquet")
            _swap_in(self.tmp, day_dir(self.root, self.day), self.old)
        except OSError as exc:
            raise write_error(exc.filename or day_dir(self.root, self.day), exc) from None
        return self.rows

    def abort(self) -> None:
        try:
            self._close_file()
        except Exception:  # the day is being thrown away: a failing close changes nothing
            pass
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> DayWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def write_day(table: pa.Table, root: str | Path, day: str, rows_per_file: int) -> None:
    """Write one in-memory day atomically (see :class:`DayWriter`)."""
    with DayWriter(root, day, table.schema, rows_per_file) as w:
        w.write(table)
        w.commit()


@contextmanager
def replaced_when_complete(target: str | Path) -> Iterator[Path]:
    """A new, empty directory ``<parent>/.<name>.tmp-<id>`` to fill; when the block ends normally it
    replaces ``target`` (see :func:`_swap_in`), when it raises (anything, an interrupt included) it is
    deleted and ``target`` is left as it was. An OSError becomes a DataError naming the path."""
    target = Path(target)
    tag = uuid.uuid4().hex[:8]
    stage = target.parent / f".{target.name}.tmp-{tag}"
    try:
        stage.mkdir(parents=True)
    except OSError as exc:
        raise write_error(stage, exc) from None
    try:
        yield stage
        _swap_in(stage, target, target.parent / f".{target.name}.old-{tag}")
    except OSError as exc:
        shutil.rmtree(stage, ignore_errors=True)
        raise write_error(stage, exc) from None
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
