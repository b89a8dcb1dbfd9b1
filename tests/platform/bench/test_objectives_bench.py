import json

import pytest

from cascadelab.platform.bench.objectives import DEFAULT_OBJECTIVES, ObjectiveBenchConfig, run_objective_bench


def test_tiny_run_writes_json_and_png(tmp_path):
    cfg = ObjectiveBenchConfig(objectives=("bce", "dftopk", "lcron", "lapsum"), n_values=(40, 60), batch=8,
                               warmup=0, steps=2, emb_dim=4, hidden=16, seq_len=5, threads=1)
    report = run_objective_bench(cfg, tmp_path)
    data = json.loads((tmp_path / "objectives.json").read_text())
    assert data == json.loads(json.dumps(report))
    assert (tmp_path / "objectives.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {(r["objective"], r["n"]): r for r in data["results"]}
    assert set(rows) == {(o, n) for o in ("model-only", "bce", "dftopk", "lcron", "lapsum") for n in (40, 60)}
    for r in rows.values():  # two timed steps: the median is their mean, between the faster and the slower
        assert r["status"] == "ok" and r["steps"] == 2 and r["batch"] == 8
        assert r["median_ms"] == pytest.approx(r["mean_ms"]) and r["min_ms"] <= r["median_ms"]
    ratios = data["ratios"]
    for name in ("model-only", "dftopk", "lcron", "lapsum"):  # every ratio is the two medians' quotient
        for n in (40, 60):
            assert ratios[f"{name}_over_bce_n{n}"] == pytest.approx(rows[(name, n)]["median_ms"]
                                                                    / rows[("bce", n)]["median_ms"])
    assert ratios["dftopk_within_1.3x_bce_n60"] is (ratios["dftopk_over_bce_n60"] <= 1.3)
    assert "bce_over_bce_n40" not in ratios
    assert data["meta"]["config"]["batch"] == 8 and data["meta"]["threads"] == 1


def test_the_timed_step_trains_the_cascade():
    import torch

    from cascadelab.platform.bench.objectives import _make_step, make_batch

    cfg = ObjectiveBenchConfig(batch=4, emb_dim=4, hidden=8, seq_len=5)
    batch = make_batch(cfg, 50, torch.device("cpu"))
    assert batch.items.shape[:2] == (4, 50) and batch.mask[:, :40].any(-1).all()
    for name in ("model-only", "dftopk"):
        step = _make_step(cfg, name, batch, torch.device("cpu"))
        cascade = next(c.cell_contents for c in step.__closure__ if isinstance(c.cell_contents, torch.nn.Module))
        before = [p.detach().clone() for p in cascade.parameters()]
        step()
        changed = sum(not torch.equal(b, p) for b, p in zip(before, cascade.parameters(), strict=True))
        assert changed > 0, name


def test_quadratic_objectives_are_skipped_over_the_memory_budget(tmp_path):
    cfg = ObjectiveBenchConfig(objectives=("bce", "lcron-diffsort"), n_values=(60,), batch=4, warmup=0, steps=1,
                               emb_dim=4, hidden=16, seq_len=5, max_quadratic_bytes=1000, plot=False, threads=1)
    rows = {r["objective"]: r for r in run_objective_bench(cfg, tmp_path)["results"]}
    assert rows["lcron-diffsort"]["status"].startswith("skipped: O(N^2) memory")
    assert rows["bce"]["status"] == "ok"
    assert run_objective_bench(cfg, tmp_path)["ratios"]["lcron-diffsort_over_bce_n60"] is None


def test_defaults_and_validation(tmp_path):
    cfg = ObjectiveBenchConfig()
    assert cfg.n_values == (40, 200, 1040) and (cfg.warmup, cfg.steps) == (2, 5) and cfg.device == "cpu"
    assert "bce" in DEFAULT_OBJECTIVES and "dftopk" in DEFAULT_OBJECTIVES and len(DEFAULT_OBJECTIVES) == 13
    with pytest.raises(ValueError, match="unknown objective"):
        run_objective_bench(ObjectiveBenchConfig(objectives=("nope",)), tmp_path)
