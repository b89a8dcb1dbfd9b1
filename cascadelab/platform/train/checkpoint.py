"""A training checkpoint on local disk: one ``cascade.pt`` file, written completely or not at all.

A Train worker writes the file into a fresh temporary directory and only then hands the directory to
Ray Train (``ray.train.Checkpoint.from_directory``), which copies it to ``train.storage_path`` and
commits it. The file is written as ``cascade.pt.partial``, flushed to disk and renamed, so a directory
never holds a truncated ``cascade.pt``; a failed write (a full disk) removes the partial file and raises
:class:`CheckpointWriteError` naming the file, and nothing reaches Ray Train: the run's last committed
checkpoint stays the one to resume from.

Test hook: :func:`write_checkpoint` takes ``fail_after_bytes``; the worker loop sets it from its test
hooks to make one write fail with ``ENOSPC`` part-way, as a full disk does.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any, BinaryIO

import torch

CHECKPOINT_FILE = "cascade.pt"


class CheckpointWriteError(OSError):
    """Writing checkpoint file ``path`` failed; ``reason`` is the OS error (e.g. ``[Errno 28] No space left
    on device``). Pickles with its fields, so the driver gets it from Ray Train's ``worker_failures``."""

    def __init__(self, path: str, reason: str, kept: str):
        super().__init__(f"writing checkpoint file {path} failed: {reason}; nothing was handed to Ray Train, "
                         f"the last committed checkpoint {kept} is kept")
        self.path, self.reason, self.kept = path, reason, kept

    def __reduce__(self):
        return type(self), (self.path, self.reason, self.kept)


class _FullDisk:
    """A writable file that fails with ENOSPC once ``limit`` bytes were written (test hook)."""

    def __init__(self, f: BinaryIO, limit: int):
        self.f, self.left = f, limit

    def write(self, data) -> int:
        if len(data) > self.left:
            self.f.write(bytes(memoryview(data)[:self.left]))
            self.f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.left -= len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _os_reason(exc: BaseException) -> str:
    """The OS error behind ``exc`` (torch.save reports a failed write as a RuntimeError raised from it)."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return f"[Errno {e.errno}] {e.strerror}"
        todo += [x for x in (e.__cause__, e.__context__) if x is not None]
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


def write_checkpoint(payload: dict[str, Any], directory: str | Path, kept: str = "of the run",
                     fail_after_bytes: int | None = None) -> Path:
    """``torch.save(payload)`` as ``directory/cascade.pt``, complete or absent; returns the file.

    ``kept`` names the checkpoint that stays when the write fails (for the error message).
    Raises CheckpointWriteError naming the file on any failed write; the partial file is removed.
    """
    final = Path(directory) / CHECKPOINT_FILE
    partial = final.with_name(CHECKPOINT_FILE + ".partial")
    try:
        with open(partial, "wb") as f:
            torch.save(payload, f if fail_after_bytes is None else _FullDisk(f, fail_after_bytes))
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, final)
    except (OSError, RuntimeError) as exc:
        partial.unlink(missing_ok=True)
        raise CheckpointWriteError(str(final), _os_reason(exc), kept) from exc
    return final


def read_checkpoint(directory: str | Path) -> dict[str, Any]:
    """The payload of a checkpoint directory: ``model``, ``optimizer``, ``state`` (LoopState fields),
    ``config``, ``vocab``, ``days`` and ``day_metrics`` (each finished day's logged metrics, by day index)."""
    return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
