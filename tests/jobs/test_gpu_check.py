"""The GPU check's CPU-side behaviour: it exits 0 with one line when no GPU is visible, and its table
reads the figures of the files the benches write."""

from __future__ import annotations

import json

import pytest
import torch

from cascadelab.jobs import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the check would run for real")
def test_without_a_gpu_it_says_so_and_exits_0(capsys, tmp_path):
    assert gpu_check.main(["--out", str(tmp_path / "gpu")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "no CUDA device" in out[0]
    assert not (tmp_path / "gpu").exists()


def test_summaries_read_the_pytest_line_and_the_bench_json(tmp_path):
    tests, operators, train = (c for c in gpu_check.checks(tmp_path) if c.name != "bench objectives")
    assert gpu_check.summarize(tests, tmp_path, "..s\n12 passed, 3 skipped in 4.1s") == "12 passed, 3 skipped"
    assert gpu_check.summarize(operators, tmp_path, "") == "operators.json not written"
    (tmp_path / "operators.json").write_text(json.dumps({"headline": {"b1024_n1000_official_over_dftopk": 1.5}}))
    assert gpu_check.summarize(operators, tmp_path, "") == "b1024_n1000 official/dftopk 1.50"
    (tmp_path / "train.json").write_text(json.dumps({"bare": {"samples_per_s": 2000.4},
                                                     "ray_1_worker": {"samples_per_s": 1500.0}}))
    assert gpu_check.summarize(train, tmp_path, "") == "bare 2000 samples/s, ray_1_worker 1500 samples/s"
