"""README's Python snippets run as written, against a real MLflow store laid out as `make demo` leaves it
(metrics under their MLflow names, :mod:`cascadelab.platform.metric_names`)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cascadelab.platform.config import load_config
from cascadelab.platform.metric_names import MetricNames

README = Path(__file__).resolve().parents[1] / "README.md"


def python_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_snippets():
    assert python_snippets(), "README.md lost its ```python examples"


@pytest.mark.parametrize("index", range(len(python_snippets())))
def test_readme_snippet_runs(index, tmp_path, monkeypatch, capsys):
    import mlflow

    monkeypatch.chdir(tmp_path)  # the snippets run from the repository root, where mlflow.db lives
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("cascadelab-demo")
    names = MetricNames.of(load_config(None, []))  # the demo's cascade
    days = [1.5, 1.25, 1.0]
    for objective, recall in (("bce", 0.74), ("dftopk", 0.81)):
        run = client.create_run(experiment, run_name=f"demo-{objective}")
        client.log_param(run.info.run_id, "objective.name", objective)
        for step, loss in enumerate(days):
            client.log_metric(run.info.run_id, names.day_name("train_loss"), loss, step=step)
        client.log_metric(run.info.run_id, names.final_name("joint_recall"), recall, step=len(days))
        client.set_terminated(run.info.run_id)
    try:
        exec(compile(python_snippets()[index], f"README.md snippet {index}", "exec"), {})
    finally:
        mlflow.set_tracking_uri(None)
    out = capsys.readouterr().out
    assert "demo-dftopk" in out and "0.81" in out and "bce" in out
    if "loss/total" in python_snippets()[index]:  # a per-day history, read back by its name
        assert "demo-bce [(0, 1.5), (1, 1.25), (2, 1.0)]" in out
