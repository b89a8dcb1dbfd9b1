"""``cascadelab sweep``: argument parsing and one-line errors, all before Ray starts."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from cascadelab.jobs import sweep as sweep_job
from cascadelab.jobs.common import run_main

ROOT = Path(__file__).parents[2]


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cascadelab")
    sub = parser.add_subparsers(dest="command", required=True)
    sweep_job.add_parser(sub)
    return parser.parse_args(["sweep", *argv])


def _errors(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("cascadelab:")]


def test_arguments():
    args = _parse("configs/studies/tau-sensitivity.yaml", "--resume", "--name", "t2", "--set", "data.path=/d",
                  "--set", "train.lr=0.02")
    assert (args.config, args.resume, args.name) == ("configs/studies/tau-sensitivity.yaml", True, "t2")
    assert args.overrides == ["data.path=/d", "train.lr=0.02"] and args.func is sweep_job.main
    args = _parse("s.yaml")
    assert (args.resume, args.name, args.overrides) == (False, None, [])


def test_config_is_required(capsys):
    with pytest.raises(SystemExit) as exc:
        _parse()
    assert exc.value.code == 2 and "CONFIG" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "needle"), [
    ("grid:\n  objective.name: [bce, nope]\n", "unknown objective 'nope'"),
    ("grid:\n  objective.tau: [0]\n", "config key 'objective.tau': expected a positive value"),
    ("grid: {}\n", "key 'grid': expected a non-empty mapping"),
    ("grid:\n  train.sed: [0, 1]\n", "unknown config key 'train.sed'"),
    ("grid:\n  objective.tau: 5\n", "key 'grid.objective.tau': expected a non-empty list of values, got 5"),
])
def test_invalid_sweep_config_is_one_line_before_ray(tmp_path, capsys, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    args = _parse(str(path))
    assert run_main(args.func, args) == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and needle in errors[0]
    assert errors[0].startswith(f"cascadelab: error: sweep config '{path}'")


def test_bad_set_override_names_the_key(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text("grid:\n  train.seed: [0, 1]\n")
    args = _parse(str(path), "--set", "data.bath_size=3")
    assert run_main(args.func, args) == 2
    assert "unknown config key 'data.bath_size'" in _errors(capsys)[0]
    args = _parse(str(path), "--set", "nokey")
    assert run_main(args.func, args) == 2
    assert "--set 'nokey': expected key=value" in _errors(capsys)[0]


def test_missing_dataset_fails_before_ray(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(f"base:\n  data: {{path: {tmp_path / 'none'}}}\ngrid:\n  train.seed: [0, 1]\n")
    args = _parse(str(path))
    assert run_main(args.func, args) == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and f"data directory '{tmp_path / 'none'}' does not exist" in errors[0]


def test_resume_of_an_unknown_sweep_is_one_line(tmp_path, tiny_dataset, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(f"base:\n  data: {{path: {tiny_dataset}}}\n  tracking: {{uri: 'sqlite:///{tmp_path}/m.db'}}\n"
                    f"  train: {{storage_path: {tmp_path / 'res'}}}\ngrid:\n  train.seed: [0, 1]\n")
    args = _parse(str(path), "--resume", "--name", "ghost")
    assert run_main(args.func, args) == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and "--resume: no sweep named 'ghost' in MLflow experiment 'cascadelab'" in errors[0]


def test_standalone_module_prints_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("grid:\n  objective.tau: [-1]\n")
    proc = subprocess.run([sys.executable, "-m", "cascadelab.jobs.sweep", str(path)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"cascadelab: error: sweep config '{path}' key 'grid.objective.tau': value -1: config key 'objective.tau': "
        "expected a positive value, got -1.0"]


def test_existing_sweep_name_needs_resume_or_a_new_name(tmp_path, tiny_dataset, capsys):
    from cascadelab.platform.tracking import start_run

    uri = f"sqlite:///{tmp_path}/m.db"
    start_run(uri, "cascadelab", "sweep-s", {}, tags={"cascadelab.sweep": "s"})
    path = tmp_path / "s.yaml"
    path.write_text(f"base:\n  data: {{path: {tiny_dataset}}}\n  tracking: {{uri: '{uri}'}}\n"
                    f"  train: {{storage_path: {tmp_path / 'res'}}}\ngrid:\n  train.seed: [0, 1]\n")
    args = _parse(str(path))
    assert run_main(args.func, args) == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and "sweep 's' already exists" in errors[0] and "--resume" in errors[0]
