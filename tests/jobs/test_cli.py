import subprocess
import sys

import pytest

from cascadelab.cli import build_parser, main
from cascadelab.jobs import COMMANDS


def test_every_subcommand_has_help(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser(["--help"]).parse_args(["--help"])
    listing = " ".join(capsys.readouterr().out.split())
    assert exc.value.code == 0
    for name, command in COMMANDS.items():
        assert f"{name} {command.summary}" in listing
        parser = build_parser([name, "--help"])
        sub = next(a for a in parser._actions if a.dest == "command")
        assert len(sub.choices[name]._actions) > 1  # the job module's own parser, not the summary
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([name, "--help"])
        assert exc.value.code == 0 and capsys.readouterr().out.startswith(f"usage: cascadelab {name}")


def test_listing_the_commands_imports_no_job_module():
    code = ("import sys; from cascadelab.cli import build_parser; build_parser(['--help']); "
            "print(sorted(m for m in sys.modules if m.startswith('cascadelab.jobs.')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['cascadelab.jobs.common']"


def test_generate_then_unknown_config_key(tmp_path, capsys):
    assert main(["generate", "--out", str(tmp_path / "d"), "--days", "2", "--requests-per-day", "16"]) == 0
    assert "wrote 32 requests over 2 days" in capsys.readouterr().out
    code = main(["train", "--set", f"data.path={tmp_path / 'd'}", "--set", "data.bath_size=3"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "unknown config key 'data.bath_size'" in err and "batch_size" in err


def test_missing_data_dir_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cascadelab.jobs.train", "--set",
                           f"data.path={tmp_path / 'none'}", "--set", f"tracking.uri=sqlite:///{tmp_path}/m.db"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"cascadelab: error: data directory '{tmp_path / 'none'}' does not exist; create one with "
        f"`cascadelab generate --out {tmp_path / 'none'}`"]


def test_generate_options_and_bad_vocab(tmp_path, capsys):
    import json

    from cascadelab.cli import main

    out = tmp_path / "g"
    assert main(["generate", "--out", str(out), "--days", "1", "--requests-per-day", "64", "--rows-per-file", "16",
                 "--vocab", "video_id=3000", "--popularity-skew", "1.2", "--no-parallel"]) == 0
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["vocab"]["video_id"] == 3000 and len(list((out / "day=2024-01-13").glob("*.parquet"))) == 4
    assert main(["generate", "--out", str(tmp_path / "h"), "--vocab", "colour=3"]) == 2
    assert "--vocab colour=3: expected FIELD=N with FIELD one of user_id" in capsys.readouterr().err
