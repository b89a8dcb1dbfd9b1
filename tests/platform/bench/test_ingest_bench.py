"""Integration: the ingest benchmark on a real local Ray cluster (tiny sizes; no timing asserted)."""

from __future__ import annotations

import json

import pytest

from cascadelab.platform.bench.ingest import IngestBenchConfig, run_ingest_bench

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_two_workers_receive_every_row_once_and_results_are_written(tmp_path, ray_local):
    # parquet_reader v2: training runs on tiny test data take v1 ("auto"), so v2 is exercised here
    cfg = IngestBenchConfig(requests=1024, rows_per_file=256, batch_size=128, workers=(2,), train_batches=2,
                            sample_num=4, parquet_reader="v2")
    result = run_ingest_bench(cfg, tmp_path)
    two = result["ray_data_2_workers"]
    assert two["rows"] == 1024 and len(two["rows_per_s_per_worker"]) == 2  # streaming_split: all rows, once
    assert min(two["rows_per_s_per_worker"]) > 0 and result["pyarrow"]["rows"] == 1024
    ratios = result["ratios"]
    assert ratios["ingest_over_train_step_2_workers"] > 0 and ratios["ingest_over_pyarrow_floor_2_workers"] > 0
    assert ratios["peak_rss_mib_pyarrow_floor"] > 0
    written = json.loads((tmp_path / "ingest.json").read_text())
    assert written["files"] == 4 and written["parquet_reader"] == "v2"
    assert (tmp_path / "ingest.png").stat().st_size > 0
