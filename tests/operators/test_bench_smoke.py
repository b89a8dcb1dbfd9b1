"""The operator benchmark runs end to end on a tiny grid and writes valid JSON and a PNG (no timing checks)."""

from __future__ import annotations

import importlib
import json

import torch

from cascadelab.operators import dftopk, dftopk_logits, neural_sort
from cascadelab.platform.bench.operators import (
    ALL_OPERATORS,
    OperatorBenchConfig,
    official_dftopk_logits,
    reference_neural_sort,
    run_operator_bench,
)


def test_tiny_run_writes_json_and_png(tmp_path):
    cfg = OperatorBenchConfig(sizes=(5, 40), batch_sizes=(1, 3), warmup=1, steps=2,
                              max_quadratic_bytes=3 * 40 * 40 * 4 - 1)  # forces one recorded skip
    report = run_operator_bench(cfg, tmp_path)
    data = json.loads((tmp_path / "operators.json").read_text())
    assert data == json.loads(json.dumps(report))
    png = (tmp_path / "operators.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    rows = data["results"]
    assert len(rows) == 2 * 2 * len(ALL_OPERATORS)
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(r["median_ms"] > 0 and r["steps"] >= 2 for r in ok)
    skipped = [r for r in rows if r["status"].startswith("skipped:")]
    assert {r["operator"] for r in skipped} <= {"softsort", "neuralsort", "neuralsort-reference-style", "diffsort"}
    assert skipped and all(r["batch"] == 3 and r["n"] == 40 for r in skipped)
    assert data["meta"]["torch"] == torch.__version__ and data["meta"]["threads"] >= 1
    assert data["meta"]["allocator"].startswith("glibc: heap only")  # the CI machine runs glibc
    ratios = data["ratios"]  # only ratios whose two cases ran: no n = 1000 here, so no n1000 ratio
    assert ratios and all(isinstance(v, float) and v > 0 for v in ratios.values())
    assert not any("n1000" in key for key in ratios)
    head = data["headline"]  # the interleaved re-timing of every case of the grid
    assert set(head) >= {"b1_n5", "b1_n40", "b3_n5", "b3_n40"} and head["b3_n40"]["rounds"]["floor"] >= 5
    assert data["ratios"]["headline_b3_n40_dftopk_over_floor"] == head["b3_n40_dftopk_over_floor"] > 0
    assert head["b1_n5_official_over_dftopk"] > 0
    mem = data["memory"]["rows"]
    assert mem and all(r["saved_bytes_operator"] > 0 for r in mem)


def test_baselines_agree_with_the_library_on_both_dftopk_paths(monkeypatch):
    """The official-style formula, written from the paper, against the library's composed path (small input)
    and its custom backward (the path every masked or large input takes): same values and gradients."""
    dft = importlib.import_module("cascadelab.operators.dftopk")
    s = torch.randn(4, 30, dtype=torch.float64)
    w = torch.randn(4, 30, dtype=torch.float64)
    x = s.clone().requires_grad_()
    want = torch.sigmoid(official_dftopk_logits(x, 7, 2.0))
    (want_grad,) = torch.autograd.grad((want * w).sum(), x)
    for composed_max in (1 << 14, 0):
        monkeypatch.setattr(dft, "_COMPOSED_MAX", composed_max)
        got = dftopk(x, 7, 2.0)
        (grad,) = torch.autograd.grad((got * w).sum(), x)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(grad, want_grad)
    torch.testing.assert_close(official_dftopk_logits(s, 7, 2.0), dftopk_logits(s, 7, 2.0))
    srt = torch.sort(s, -1, descending=True).values  # and both against theta from a full sort
    torch.testing.assert_close(official_dftopk_logits(s, 7, 2.0), (s - srt[:, 6:8].mean(-1, keepdim=True)) / 2.0)


def test_reference_neural_sort_is_the_on3_form_of_the_library_operator():
    s = torch.randn(4, 30, dtype=torch.float64)
    torch.testing.assert_close(reference_neural_sort(s, 0.5), neural_sort(s, 0.5))
    hard = reference_neural_sort(s, 1e-6).argmax(-1)  # tau -> 0: row r picks the r-th largest item
    torch.testing.assert_close(hard, torch.sort(s, -1, descending=True).indices)


def test_lapsum_reference_is_timed_beside_ours(tmp_path):
    ref = tmp_path / "ref.py"  # stands in for the user's copy of the authors' code: same call signature
    ref.write_text("from cascadelab.operators import lapsum_topk\n\n"
                   "def soft_top_k(r, k, alpha):\n"
                   "    assert k.shape == r.shape[:1] and k.dtype.is_floating_point and alpha.dim() == 0\n"
                   "    return lapsum_topk(r, k, float(alpha))\n")
    cfg = OperatorBenchConfig(sizes=(5, 40), batch_sizes=(2,), warmup=1, steps=2, operators=("lapsum",),
                              lapsum_reference=str(ref), memory=False, plot=False)
    report = run_operator_bench(cfg, tmp_path)
    assert {r["operator"] for r in report["results"] if r["status"] == "ok"} == {"lapsum", "lapsum-reference"}
    assert report["ratios"]["lapsum_over_reference_b2_n40"] > 0
    assert report["ratios"]["headline_b2_n40_lapsum_over_reference"] > 0


def test_lapsum_reference_must_define_soft_top_k(tmp_path):
    import pytest

    (tmp_path / "bad.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="lapsum_reference: .* defines no function soft_top_k"):
        run_operator_bench(OperatorBenchConfig(lapsum_reference=str(tmp_path / "bad.py")), tmp_path)
