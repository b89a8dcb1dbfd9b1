"""``cascadelab convert recflow``: the job module's parser and main, through its own argparse parser."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cascadelab import cli
from cascadelab.jobs import convert
from cascadelab.jobs.common import run_main
from cascadelab.platform.data.schema import DatasetMeta, day_dir
from tests.platform.data.diskfull import ENOSPC_REASON, fill_parquet_writes
from tests.platform.data.recflow_fixture import DAYS, write_recflow_fixture

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recflow")
    write_recflow_fixture(root, data_subdir=True)
    return root


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cascadelab")
    sub = parser.add_subparsers(dest="command", required=True)
    convert.add_parser(sub)
    args = parser.parse_args(argv)
    return run_main(args.func, args)


def test_convert_all_days(release, tmp_path, capsys):
    out = tmp_path / "o"
    assert _run(["convert", "recflow", "--src", str(release), "--out", str(out)]) == 0
    meta = DatasetMeta.read(out)
    assert meta.days == list(DAYS) and meta.mode == "two_stage" and meta.source == "recflow"
    assert "60 requests over 2 days" in capsys.readouterr().out


def test_day_range_three_stage_and_force(release, tmp_path):
    out = tmp_path / "o"
    argv = ["convert", "recflow", "--src", str(release / "data"), "--out", str(out), "--start-day", DAYS[1],
            "--end-day", DAYS[1], "--mode", "three_stage"]
    assert _run(argv) == 0
    meta = DatasetMeta.read(out)
    assert meta.days == [DAYS[1]] and meta.mode == "three_stage"
    part = next(day_dir(out, DAYS[1]).glob("*.parquet"))
    os.utime(part, ns=(10**18, 10**18))
    assert _run(argv) == 0 and part.stat().st_mtime_ns == 10**18  # skipped
    assert _run([*argv, "--force"]) == 0 and part.stat().st_mtime_ns != 10**18  # rewritten
    assert _run(["convert", "recflow", "--src", str(release), "--out", str(out), "--mode", "three_stage",
                 "--days", ",".join(DAYS)]) == 0
    assert DatasetMeta.read(out).days == list(DAYS)


@pytest.mark.parametrize("extra, message", [
    (["--days", "2024-01-20"], "all_stage/2024-01-20.feather' is missing"),
    (["--mode", "four_stage"], "mode 'four_stage': expected two_stage or three_stage"),
    (["--days", DAYS[0], "--start-day", DAYS[0]], "give either --days or --start-day/--end-day"),
    (["--start-day", "13/01/2024"], "--start-day '13/01/2024': expected a date YYYY-MM-DD"),
])
def test_bad_arguments_are_one_line_errors(release, tmp_path, capsys, extra, message):
    rc = _run(["convert", "recflow", "--src", str(release), "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1 and err.startswith("cascadelab: error:")
    assert not (tmp_path / "o").exists()


def test_missing_src_is_a_one_line_error(tmp_path, capsys):
    rc = _run(["convert", "recflow", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and f"RecFlow source '{tmp_path / 'nope'}' does not exist" in err and err.count("\n") == 1


def test_recflow_subcommand_is_required():
    parser = argparse.ArgumentParser(prog="cascadelab")
    convert.add_parser(parser.add_subparsers(dest="command", required=True))
    with pytest.raises(SystemExit):
        parser.parse_args(["convert", "--src", "x", "--out", "y"])


def test_standalone_module(release, tmp_path):
    out = tmp_path / "o"
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-m", "cascadelab.jobs.convert", "recflow", "--src", str(release),
                           "--out", str(out), "--days", DAYS[0]], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "peak RSS" in proc.stderr and DatasetMeta.read(out).days == [DAYS[0]]


def test_registered_cli(release, tmp_path):
    assert cli.main(["convert", "recflow", "--src", str(release), "--out", str(tmp_path / "o")]) == 0


def test_disk_full_is_a_one_line_error_naming_the_file(release, tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    fill_parquet_writes(monkeypatch, lambda p: p.parent.name == f".tmp-day={DAYS[1]}")
    assert _run(["convert", "recflow", "--src", str(release), "--out", str(out)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cascadelab:")]
    assert errors == [f"cascadelab: error: '{out / f'.tmp-day={DAYS[1]}' / 'part-00000.parquet'}': could not be "
                      f"written ({ENOSPC_REASON})"]
    assert DatasetMeta.read(out).days == [DAYS[0]] and not day_dir(out, DAYS[1]).exists()
