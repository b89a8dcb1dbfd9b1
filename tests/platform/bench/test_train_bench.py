"""Integration: the train benchmark on a real local Ray cluster (tiny sizes; no timing asserted)."""

from __future__ import annotations

import json

import pytest

from cascadelab.platform.bench.roofline import cascade_cost
from cascadelab.platform.bench.train import TrainBenchConfig, run_train_bench
from cascadelab.platform.config import load_config
from cascadelab.platform.data.synthetic import SyntheticConfig

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_both_sides_train_the_same_rows_and_the_roofline_is_consistent(tmp_path, ray_local):
    cfg = TrainBenchConfig(requests_per_day=128, days=3, batch_size=64, two_workers=False)
    result = run_train_bench(cfg, tmp_path)
    assert result["ray_1_worker"]["train_rows"] == 256  # two training days, every row once
    assert result["bare"]["steps"] == 256 // 64 - 1  # the first step is not timed
    roof = result["roofline"]
    expected = cascade_cost(load_config(None, {"data": {"batch_size": 64}}), SyntheticConfig().vocab, 64)
    assert roof["flops_per_sample"] == pytest.approx(expected["flops_per_sample"])
    assert roof["bytes_per_sample"] == pytest.approx(expected["bytes_per_sample"])
    threads = result["threads"]
    assert roof["ray_samples_per_s_per_core"] == pytest.approx(result["ray_1_worker"]["samples_per_s"] / threads)
    ceiling = min(roof["peak_flops_per_core"] / roof["flops_per_sample"],
                  roof["bandwidth_per_core"] / roof["bytes_per_sample"])
    assert roof["roofline_samples_per_s_per_core"] == pytest.approx(ceiling)
    for side in ("bare", "ray"):
        assert roof[f"{side}_roofline_fraction"] == pytest.approx(roof[f"{side}_samples_per_s_per_core"] / ceiling)
        assert 0 < roof[f"{side}_roofline_fraction"] < 1  # nothing runs faster than its roofline
    assert json.loads((tmp_path / "train.json").read_text())["roofline"] == roof
    cost, ratios = result["fixed_cost"], result["ratios"]
    assert len(cost["day_boundary_s"]) == 1 and 0 < cost["day_boundary_s"][0] < cost["time_to_first_step_s"]
    assert 0 < ratios["end_to_end_over_steady_1_worker"] < 1  # fit() holds more than the steady steps
    assert ratios["time_to_first_step_s"] == cost["time_to_first_step_s"]  # what MLflow gets


def test_the_fixed_costs_add_up_to_the_time_to_the_first_step():
    from cascadelab.platform.bench.train import fixed_costs

    timeline = {"start": 100.0, "fit_start": 102.0, "fit_call": 103.0, "worker_start": 109.0, "ready": 109.5,
                "final_eval_start": 137.25, "final_eval_end": 138.5, "returned": 138.75, "fit_end": 140.0,
                "day_first_step": {0: 111.0, 1: 121.5, 2: 130.0}, "day_last_step": {0: 121.0, 1: 129.0, 2: 137.0}}
    cost = fixed_costs(timeline)
    assert cost["time_to_first_step_s"] == 11.0
    parts = ("before_fit_s", "datasets_planned_s", "worker_group_start_s", "trainer_setup_s", "first_batch_wait_s")
    assert [cost[p] for p in parts] == pytest.approx([2.0, 1.0, 6.0, 0.5, 1.5])
    assert sum(cost[p] for p in parts) == pytest.approx(cost["time_to_first_step_s"])
    assert cost["day_boundary_s"] == [0.5, 1.0] and cost["day_boundary_max_s"] == 1.0
    assert cost["after_last_step_s"] == 3.0
    ends = ("last_report_s", "final_eval_s", "final_report_s", "shutdown_s")
    assert [cost[p] for p in ends] == pytest.approx([0.25, 1.25, 0.25, 1.25])
    assert sum(cost[p] for p in ends) == pytest.approx(cost["after_last_step_s"])
