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
    cfg = TrainBenchConfig(requests_per_day=256, days=2, batch_size=64, two_workers=False)
    result = run_train_bench(cfg, tmp_path)
    assert result["ray_1_worker"]["train_rows"] == 256  # one training day, every row once
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
