"""Helpers the integration tests share: free local ports and a real ``mlflow server`` process.

A server is started with MLflow's job runner off (``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``, as
``make ui`` starts it): the runner's Huey consumers are eight more processes that no test uses, and
on two cores they hold the server's start-up back several-fold.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

MLFLOW = str(Path(sys.executable).with_name("mlflow"))
NO_JOB_RUNNER = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def free_ports(n: int) -> list[int]:
    """``n`` distinct local TCP ports that were free a moment ago (all bound at once, then released)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    """Whether ``url`` answers 200 now (False while nothing listens or it answers otherwise)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200
    except OSError:
        return False


def wait_http_ok(url: str, timeout_s: float, proc: subprocess.Popen | None = None,
                 log: Path | None = None) -> None:
    """Until ``url`` answers 200; raises RuntimeError with the tail of ``log`` when ``proc`` exits first
    or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if http_ok(url):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited ({proc.returncode}) before it answered:\n{_tail(log)}")
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer 200 within {timeout_s:.0f} s:\n{_tail(log)}")


def _tail(log: Path | None) -> str:
    return log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else "(no log)"


class MlflowServer:
    """A real ``mlflow server`` on a free local port, over ``store_uri`` (default: ``root/mlflow.db``),
    with ``--default-artifact-root`` when ``artifact_root`` is given; its output goes to
    ``root/server.log``. Tests may kill it (the CLI and its uvicorn worker, one process group) and start
    it again on the same port and store."""

    def __init__(self, root: Path, store_uri: str | None = None, artifact_root: Path | None = None):
        self.root, self.port = Path(root), free_port()
        self.store_uri = store_uri or f"sqlite:///{self.root / 'mlflow.db'}"
        self.artifact_root = artifact_root
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = self.root / "server.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120.0) -> MlflowServer:
        cmd = [MLFLOW, "server", "--backend-store-uri", self.store_uri, "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1"]
        if self.artifact_root is not None:
            cmd += ["--default-artifact-root", str(self.artifact_root)]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=self.root,
                                         env={**os.environ, **NO_JOB_RUNNER}, start_new_session=True)
        wait_http_ok(self.uri + "/health", timeout_s, self.proc, self.log)
        return self

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
