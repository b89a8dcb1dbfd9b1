"""Integration: the converter benchmark writes a release-layout day, converts it in a fresh Ray task process."""

from __future__ import annotations

import json

import pytest

from cascadelab.platform.bench.convert import ConvertBenchConfig, run_convert_bench

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_tiny_run_reports_memory_and_extrapolation(tmp_path, ray_local):
    result = run_convert_bench(ConvertBenchConfig(requests=(100, 300), candidates=40), tmp_path)
    small, large = result["sizes"]
    assert small["requests"] == 100 and large["requests"] == 300
    assert large["peak_rss_mib"] > 0 and large["requests_per_s"] > 0
    assert result["ratios"]["extrapolated_full_day_peak_gib"] > 0
    assert json.loads((tmp_path / "convert.json").read_text())["sizes"][1]["candidates_per_request"] == 40
    assert (tmp_path / "convert.png").stat().st_size > 0


def test_sizes_must_be_two_increasing(tmp_path):
    with pytest.raises(ValueError, match="requests: expected two increasing day sizes"):
        run_convert_bench(ConvertBenchConfig(requests=(300, 100)), tmp_path)
