"""One driver per sweep: the lock on <storage>/sweeps/.<name>.lock (no Ray needed)."""

import json
import os
import subprocess
import sys

import pytest

from cascadelab.platform.config import ConfigError
from cascadelab.platform.tune.lock import lock_path, sweep_lock
from cascadelab.platform.tune.sweep import parse_sweep, run_sweep


def test_a_second_holder_is_refused_naming_the_sweep_the_holder_and_the_file(tmp_path):
    with sweep_lock(tmp_path, "tau") as path:
        assert path == lock_path(tmp_path, "tau")
        assert json.loads(path.read_text())["pid"] == os.getpid()
        with pytest.raises(ConfigError) as err, sweep_lock(tmp_path, "tau"):
            pass
        msg = str(err.value)
        assert "sweep 'tau' is already running" in msg and f"pid {os.getpid()}" in msg and str(path) in msg
        assert "\n" not in msg
        assert json.loads(path.read_text())["pid"] == os.getpid()  # the refused one wrote nothing
        with sweep_lock(tmp_path, "other"):  # another name is another lock
            pass
    with sweep_lock(tmp_path, "tau"):  # released at the end of the block
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom cascadelab.platform.tune.lock import sweep_lock\n"
         "with sweep_lock(sys.argv[1], 'tau'):\n    print('held', flush=True)\n    time.sleep(600)\n", str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=f"pid {holder.pid} "), sweep_lock(tmp_path, "tau"):
            pass
    finally:
        holder.kill()
        holder.wait()
    with sweep_lock(tmp_path, "tau"):
        pass


def test_run_sweep_refuses_a_running_sweep_before_anything_starts(tiny_dataset, tmp_path):
    spec = parse_sweep({"name": "busy", "base": {"data": {"path": str(tiny_dataset)},
                                                 "train": {"storage_path": str(tmp_path / "results")},
                                                 "tracking": {"uri": f"sqlite:///{tmp_path / 'm.db'}"}},
                        "grid": {"train.seed": [0, 1]}})
    with sweep_lock(tmp_path / "results" / "sweeps", "busy"), pytest.raises(ConfigError, match="already running"):
        run_sweep(spec)
    assert not (tmp_path / "m.db").exists()  # refused before the MLflow store was opened
    assert not (tmp_path / "results" / "sweeps" / "busy").exists()
