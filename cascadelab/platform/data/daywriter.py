"""Atomic, streaming writes of one day of the dataset: part files in a temporary directory, then a rename."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cascadelab.platform.data.schema import day_dir


class DayWriter:
    """Streams tables of one day into ``part-NNNNN.parquet`` files of ``rows_per_file`` rows each.

    Files go to ``<root>/.tmp-day=D``; :meth:`commit` moves the directory to ``<root>/day=D`` (a previous
    version is renamed aside first and deleted only after the new one is in place, so an interrupted
    commit never loses both). Used as a context manager, an exception removes the temporary directory and
    leaves any existing day untouched. Memory: one written table at a time.
    """

    def __init__(self, root: str | Path, day: str, schema: pa.Schema, rows_per_file: int):
        if rows_per_file <= 0:
            raise ValueError(f"rows_per_file: expected a positive number of rows, got {rows_per_file}")
        self.root, self.day, self.schema, self.rows_per_file = Path(root), day, schema, rows_per_file
        self.tmp = self.root / f".tmp-day={day}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self.rows = 0
        self._files = 0
        self._writer: pq.ParquetWriter | None = None
        self._in_file = 0

    def write(self, table: pa.Table) -> None:
        table = table.cast(self.schema) if table.schema != self.schema else table
        start = 0
        while start < table.num_rows:
            if self._writer is None:
                self._writer = pq.ParquetWriter(self.tmp / f"part-{self._files:05d}.parquet", self.schema)
                self._files += 1
                self._in_file = 0
            take = min(self.rows_per_file - self._in_file, table.num_rows - start)
            self._writer.write_table(table.slice(start, take))
            start += take
            self._in_file += take
            self.rows += take
            if self._in_file == self.rows_per_file:
                self._close_file()

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def commit(self) -> int:
        """Close the last file and put the day in place; returns the number of rows written."""
        self._close_file()
        if self._files == 0:  # an empty day still gets one (empty) file with the schema
            pq.write_table(self.schema.empty_table(), self.tmp / "part-00000.parquet")
        final = day_dir(self.root, self.day)
        old = self.root / f".old-day={self.day}"
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            final.rename(old)
        self.tmp.rename(final)
        if old.exists():
            shutil.rmtree(old)
        return self.rows

    def abort(self) -> None:
        self._close_file()
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
