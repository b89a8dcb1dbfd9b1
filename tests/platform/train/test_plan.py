"""The run plan: what a run reads and the one-line errors it raises, all before any Ray or MLflow work."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from cascadelab.platform.config import ConfigError, load_config
from cascadelab.platform.data.schema import DataError
from cascadelab.platform.train.plan import (
    check_cpu_budget,
    local_dir,
    on_cluster,
    plan_run,
    resolve_storage_path,
)

ROOT = Path(__file__).parents[3]


def _cfg(tiny_dataset, tmp_path, **extra):
    return load_config(None, {"data": {"path": str(tiny_dataset)}, "train": {"storage_path": str(tmp_path / "res")},
                              "tracking": {"uri": f"sqlite:///{tmp_path}/m.db"}, **extra})


def test_plan_resolves_days_groups_storage_and_name(tiny_dataset, tmp_path):
    cfg = _cfg(tiny_dataset, tmp_path)
    plan = plan_run(cfg)
    assert plan.train_days == ("2024-01-13", "2024-01-14") and plan.eval_day == "2024-01-15"
    assert plan.days == ["2024-01-13", "2024-01-14", "2024-01-15"]
    assert plan.groups == ("rank_pos", "rank_neg", "coarse_neg", "prerank_neg") and plan.candidates == 40
    assert plan.rows_per_day == {d: 192 for d in plan.days} and plan.vocab["video_id"] == 5000
    assert plan.storage_path == str(tmp_path / "res") and plan.run_dir == tmp_path / "res" / plan.run_name
    assert plan.run_name.startswith("dftopk-") and plan.config.tracking.run_name == plan.run_name
    assert plan.stage_names == ["retrieval", "ranking"] and not plan.resume and plan.use_gpu is None
    assert cfg.tracking.run_name is None  # the caller's config is left as it was
    assert plan_run(cfg).run_name != plan.run_name  # a fresh name every time: Ray Train resumes a reused one


def test_plan_pickles_for_the_workers(tiny_dataset, tmp_path):
    plan = plan_run(_cfg(tiny_dataset, tmp_path))
    assert pickle.loads(pickle.dumps(plan)) == plan


def test_a_stage_larger_than_the_candidate_lists_is_refused(tiny_dataset, tmp_path):
    stages = [{"model": "dssm", "k": 50}, {"model": "din", "k": 20}]
    with pytest.raises(ConfigError) as exc:
        plan_run(_cfg(tiny_dataset, tmp_path, stages=stages))
    assert str(exc.value) == (f"config key 'stages[0].k': 50 is more than the 40 candidates per request of "
                              f"{tiny_dataset}; expected k <= 40")
    with pytest.raises(ConfigError, match=r"'stages\[0\].k': 50 is more than the 45 candidates per request "
                                          r"\(40 logged \+ 5 in-batch negatives\)"):
        plan_run(_cfg(tiny_dataset, tmp_path, stages=stages, data={"path": str(tiny_dataset), "sample_num": 20,
                                                                   "eval_sample_num": 5}))
    plan = plan_run(_cfg(tiny_dataset, tmp_path, stages=stages,
                         data={"path": str(tiny_dataset), "sample_num": 10, "eval_sample_num": 10}))
    assert plan.candidates == 50


@pytest.mark.parametrize("extra, error, needle", [
    ({"stages": [{"model": "dssm", "k": 30}, {"model": "mlp", "k": 25}, {"model": "din", "k": 20}]}, ConfigError,
     "config key 'stages': 3 stages need three-stage data"),
    ({"data": {"eval_day": "2030-01-01"}}, ConfigError, "config key 'data.eval_day': day '2030-01-01'"),
    ({"data": {"train_days": ["2024-01-12"]}}, ConfigError, "config key 'data.train_days': ['2024-01-12']"),
])
def test_config_errors_name_the_key(tiny_dataset, tmp_path, extra, error, needle):
    if "data" in extra:
        extra = {"data": {"path": str(tiny_dataset), **extra["data"]}}
    with pytest.raises(error) as exc:
        plan_run(_cfg(tiny_dataset, tmp_path, **extra))
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_a_missing_day_names_its_directory(tiny_dataset, tmp_path):
    import shutil

    copy = tmp_path / "ds"
    shutil.copytree(tiny_dataset, copy)
    shutil.rmtree(copy / "day=2024-01-14")
    with pytest.raises(DataError, match="day=2024-01-14"):
        plan_run(_cfg(copy, tmp_path))


def test_resume_needs_the_run_directory_and_an_exact_name_resumes_it(tiny_dataset, tmp_path):
    cfg = _cfg(tiny_dataset, tmp_path)
    with pytest.raises(ConfigError, match="--resume ghost: no Ray Train run of that name under "
                                          f"train.storage_path '{tmp_path / 'res'}'"):
        plan_run(cfg, resume="ghost")
    assert not plan_run(cfg, run_name="trial-1").resume  # nothing to resume yet: created
    (tmp_path / "res" / "trial-1").mkdir(parents=True)
    plan = plan_run(cfg, run_name="trial-1")
    assert plan.resume and plan.run_name == "trial-1"


def test_cpu_budget_and_gpu_are_settled_on_the_cluster(tiny_dataset, tmp_path):
    plan = plan_run(_cfg(tiny_dataset, tmp_path, train={"num_workers": 2, "cpus_per_worker": 0.5}))
    assert on_cluster(plan, 2.0, use_gpu=False).use_gpu is False
    assert on_cluster(plan, 4.0, use_gpu=True).use_gpu is True
    with pytest.raises(ConfigError, match="= 2 CPUs leaves no CPU for Ray Data on a cluster with 2 CPUs; use at "
                                          r"most 1 CPUs in total \(e.g. train.cpus_per_worker=0.5\)"):
        check_cpu_budget(_cfg(tiny_dataset, tmp_path, train={"num_workers": 2}), 2.0)
    with pytest.raises(ConfigError, match="= 1 CPUs leaves no CPU for Ray Data on a cluster with 1 CPUs"):
        on_cluster(plan, 1.0, use_gpu=False)


@pytest.mark.parametrize("path, local", [("s3://b/x", None), ("gs://b/x", None), ("file:///abs/x", Path("/abs/x")),
                                         ("/abs/x", Path("/abs/x"))])
def test_storage_paths(path, local):
    assert local_dir(path) == local
    assert resolve_storage_path(path) == path


def test_relative_storage_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_storage_path("results") == str(tmp_path / "results")


def test_checks_that_need_no_cluster_fail_before_ray_starts(tiny_dataset, tmp_path):
    """In a fresh process: a too-large stage, workers holding every CPU, a --resume with no MLflow run;
    each one line, with Ray never started and (but for the --resume lookup) no MLflow store written."""
    (tmp_path / "res" / "ghost").mkdir(parents=True)
    code = f"""
import os, ray
from cascadelab.platform.config import ConfigError, load_config
from cascadelab.platform.train.run import run_training
base = {{"data": {{"path": {str(tiny_dataset)!r}}}, "train": {{"storage_path": {str(tmp_path / 'res')!r}}},
         "tracking": {{"uri": "sqlite:///{tmp_path}/m.db"}}}}
cases = [({{"stages": [{{"model": "dssm", "k": 50}}, {{"model": "din", "k": 20}}]}}, None),
         ({{"train": {{"num_workers": 2, "cpus_per_worker": float(os.cpu_count())}}}}, None), ({{}}, "ghost")]
for extra, resume in cases:
    try:
        run_training(load_config(None, {{**base, **extra}}), resume=resume)
    except ConfigError as e:
        print("ERR", e, "| db" if os.path.exists("{tmp_path}/m.db") else "| no db")
print("ray started:", ray.is_initialized())
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "RAY_ADDRESS": ""})
    lines = proc.stdout.splitlines()
    assert len(lines) == 4, proc.stdout + proc.stderr[-3000:]
    assert lines[0].startswith("ERR config key 'stages[0].k': 50 is more than the 40 candidates")
    assert "no db" in lines[0]
    assert "leaves no CPU for Ray Data" in lines[1] and "no db" in lines[1]
    assert lines[2].startswith("ERR --resume ghost: expected one MLflow run of that name")
    assert lines[3] == "ray started: False"
