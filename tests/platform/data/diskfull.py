"""Injected disk-full faults for the data writers: the write call fails with ENOSPC after a few bytes."""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path

import pyarrow.ipc as ipc
import pyarrow.parquet as pq

ENOSPC_REASON = "No space left on device"


def _full() -> OSError:
    return OSError(errno.ENOSPC, ENOSPC_REASON)


def fill_parquet_writes(monkeypatch, fails: Callable[[Path], bool]) -> list[Path]:
    """``pq.ParquetWriter.write_table`` raises ENOSPC for a file where ``fails(path)``, after appending a few
    bytes to it (a half-written part file); returns the paths written to, in order."""
    real = pq.ParquetWriter.write_table
    seen: list[Path] = []

    def write_table(self, table, *args, **kwargs):
        path = Path(self.where)
        seen.append(path)
        if fails(path):
            with open(path, "ab") as f:
                f.write(b"\0" * 64)
            raise _full()
        return real(self, table, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", write_table)
    return seen


def fill_ipc_writes(monkeypatch, after: int) -> None:
    """Arrow IPC files (the converter's sequence spill) take ``after`` record batches, then ENOSPC."""
    real = ipc.RecordBatchFileWriter.write_batch
    count = [0]

    def write_batch(self, batch, *args, **kwargs):
        count[0] += 1
        if count[0] > after:
            raise _full()
        return real(self, batch, *args, **kwargs)

    monkeypatch.setattr(ipc.RecordBatchFileWriter, "write_batch", write_batch)
