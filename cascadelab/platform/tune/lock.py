"""One sweep of a name at a time: an exclusive lock on ``<storage>/sweeps/.<name>.lock`` held by the
sweep's driver from its first check to its end.

Two drivers of one sweep (a second start, or ``--resume`` while the first still runs) would both
write its trials' directories and MLflow runs. The lock is a ``flock`` on the file, which the kernel
releases when the process ends however it ends (SIGKILL included), so an interrupted sweep never
leaves a stale lock behind. The file holds the holder's pid, host and start time, for the refusal's
message; it stays on disk and is rewritten by the next holder. Remote storage (a URI) is not locked:
there the sweep's name check in MLflow is the only guard.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from cascadelab.platform.config import ConfigError


def lock_path(sweeps_root: str | Path, name: str) -> Path:
    """The lock file of sweep ``name`` under ``sweeps_root`` (``<storage>/sweeps``)."""
    return Path(sweeps_root) / f".{name}.lock"


def _holder(path: Path) -> str:
    try:
        held = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        held = {}
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held["since"])) if "since" in held else "?"
    return f"pid {held.get('pid', '?')} on {held.get('host', '?')}, since {since}"


@contextlib.contextmanager
def sweep_lock(sweeps_root: str | Path, name: str) -> Iterator[Path]:
    """Hold sweep ``name``'s lock for the block. Raises ConfigError (one line naming the sweep, the
    process that holds it and the file) when another driver holds it; nothing is written then."""
    path = lock_path(sweeps_root, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"sweep '{name}' is already running ({_holder(path)}; lock {path}): wait for it "
                              "to end or stop it, then start or --resume it again") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "since": time.time()}).encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the lock
