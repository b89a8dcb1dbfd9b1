"""The console without Ray: one-line failures, driver progress lines, Ray's logging levels, run names."""

from __future__ import annotations

import logging

import pytest

from cascadelab.platform import runtime
from cascadelab.platform.config import load_config, run_params
from cascadelab.platform.runtime import one_line_error
from cascadelab.platform.train.plan import plan_run
from cascadelab.platform.train.run import DriverProgress, resolved_config


class _GroupError(Exception):  # the shape of Ray Train's WorkerGroupError: rank -> the exception it raised
    def __init__(self, failures):
        super().__init__("Training failed.\nTraceback (most recent call last):\n  ...")
        self.worker_failures = failures


def test_a_failure_is_one_line_naming_the_workers_error():
    assert one_line_error(ValueError("bad value\nmore")) == "ValueError: bad value"
    err = _GroupError({1: RuntimeError("late"), 0: KeyError("injected failure at step 3")})
    assert one_line_error(err) == "KeyError: 'injected failure at step 3'"
    assert one_line_error(RuntimeError()) == "RuntimeError"


def test_ray_and_mlflow_loggers_are_quiet_unless_verbose():
    try:
        runtime.set_verbose(False)
        assert all(logging.getLogger(n).level == logging.WARNING for n in ("ray", "ray.data", "mlflow"))
        assert runtime._init_kwargs() == {"log_to_driver": False, "logging_level": logging.ERROR}
        runtime.set_verbose(True)
        assert logging.getLogger("ray.data").level == logging.INFO
        assert runtime._init_kwargs()["log_to_driver"] is True
    finally:
        runtime.set_verbose(False)


@pytest.fixture
def plan(tiny_dataset, tmp_path):
    cfg = load_config(None, [f"data.path={tiny_dataset}", "data.batch_size=64", f"tracking.uri=sqlite:///{tmp_path}/m.db",
                             f"train.storage_path={tmp_path}/r", "train.fail_at_step=3"])
    return plan_run(cfg)


def test_progress_lines_per_day_with_eta(plan, caplog):
    shown = DriverProgress(plan, enabled=False)
    assert shown.total == 6  # 2 training days x 192 rows / 64 per step
    with caplog.at_level(logging.INFO, logger="cascadelab.platform.train.run"):
        shown.show({"global_step": 2, "day": "2024-01-13", "mid_day": True})  # mid-day: no line
        shown.show({"global_step": 3, "day": "2024-01-13", "train_loss": 1.25, "samples_per_s": 640.0})
        shown.show({"global_step": 6, "joint_recall": 0.5, "train_loss": 1.0})  # the final report
    (line,) = [r.getMessage() for r in caplog.records]
    assert "day 2024-01-13 done (3/6 steps): loss 1.2500, 640 samples/s, ETA " in line


def test_logged_params_are_the_resolved_config_without_test_keys(plan, tiny_dataset):
    import dataclasses

    cfg = resolved_config(dataclasses.replace(plan, use_gpu=False))
    params = run_params(cfg)
    assert params["data.train_days"] == ["2024-01-13", "2024-01-14"] and params["data.eval_day"] == "2024-01-15"
    assert params["train.use_gpu"] == "false" and params["data.path"] == str(tiny_dataset.resolve())
    assert "train.fail_at_step" not in params and "train.fail_rank" not in params
    assert cfg.train.fail_at_step == 3  # still in the config the workers get


def test_sweep_children_are_named_by_what_differs():
    from cascadelab.platform.tune.sweep import trial_run_name

    cfg = load_config(None, ["objective.name=dftopk"])
    plan = {"name": "tau-sensitivity", "keys": ["objective.tau", "train.seed"], "run_names": "point"}
    assert trial_run_name(plan, cfg, {"objective.tau": 5, "train.seed": 0}, "ab12c_00003") == \
        "dftopk-tau=5-seed=0-ab12c_00003"
    old = {"name": "tau-sensitivity", "keys": ["objective.tau"]}  # a sweep stored before: names kept
    assert trial_run_name(old, cfg, {"objective.tau": 5}, "ab12c_00003") == "tau-sensitivity-ab12c_00003"


class _Sink:
    """A queue's ``put_nowait`` that records what it gets, or fails / hangs as told."""

    def __init__(self, fail: bool = False, hang_s: float = 0.0):
        self.got, self.fail, self.hang_s = [], fail, hang_s

    def put_nowait(self, item):
        import time

        time.sleep(self.hang_s)
        if self.fail:
            raise RuntimeError("the queue actor is gone")
        self.got.append(item)


def test_live_progress_sends_the_latest_step_at_most_once_per_interval():
    import time

    from cascadelab.platform.train.loop import LiveProgress

    sink = _Sink()
    live = LiveProgress(sink, interval_s=0.2)
    t0 = time.perf_counter()
    for step in range(1, 101):  # 100 steps over ~1 s
        live.update(step, "2024-01-13", rows=64.0 * step)
        time.sleep(0.01)
    time.sleep(0.3)
    live.close()
    elapsed = time.perf_counter() - t0
    assert 2 <= len(sink.got) <= elapsed / 0.2 + 1
    assert all(u["live"] and u["day"] == "2024-01-13" for u in sink.got)
    steps = [u["global_step"] for u in sink.got]
    assert steps == sorted(set(steps)) and steps[-1] == 100  # no step sent twice; the last one arrives
    assert "samples_per_s" not in sink.got[0]
    rates = [u["samples_per_s"] for u in sink.got[1:-1]]  # ~64 rows per 10 ms
    assert rates and all(500 < r < 7000 for r in rates)


@pytest.mark.parametrize("sink", [_Sink(fail=True), _Sink(hang_s=5.0)], ids=["failing", "hanging"])
def test_a_lost_live_update_never_fails_or_slows_training(sink):
    import time

    from cascadelab.platform.train.loop import LiveProgress

    live = LiveProgress(sink, interval_s=0.05)
    t0 = time.perf_counter()
    for step in range(200):
        live.update(step, "d", rows=float(step))
        time.sleep(0.001)
    live.close()
    assert time.perf_counter() - t0 < 2.0 and sink.got == []


def test_the_bar_moves_within_a_day_on_live_updates_and_shows_the_live_rate(plan):
    import io

    from tqdm import tqdm

    shown = DriverProgress(plan, enabled=False)
    shown.bar = tqdm(total=shown.total * shown.per_step, file=io.StringIO(), disable=False)
    shown.show({"global_step": 2, "day": "2024-01-13", "samples_per_s": 512.0, "live": True})
    assert shown.bar.n == 2 * 64 and shown.postfix["now"] == "512/s"
    shown.show({"global_step": 3, "day": "2024-01-13", "train_loss": 1.25, "samples_per_s": 640.0})
    shown.show({"global_step": 2, "day": "2024-01-14", "live": True})  # late: the bar never goes back
    assert shown.bar.n == 3 * 64
    assert shown.postfix["loss"] == "1.2500" and shown.postfix["day_rate"] == "640/s"
    shown.bar.close()
