"""``cascadelab generate --vocab FIELD=N``: sizes parsed like ``--set`` values, bad input named in one line."""

import argparse

import pytest

from cascadelab.jobs import generate as generate_job
from cascadelab.jobs.common import run_main
from cascadelab.jobs.generate import parse_vocab
from cascadelab.platform.config import ConfigError
from cascadelab.platform.data.schema import DatasetMeta


def test_vocab_sizes_override_named_fields():
    assert parse_vocab(["video_id=3000", "user_id= 5", "video_id=40"]) == {"video_id": 40, "user_id": 5}
    assert parse_vocab([]) == {}


@pytest.mark.parametrize("item, match", [
    ("colour=3", "--vocab colour=3: expected FIELD=N with FIELD one of user_id, device_id"),
    ("video_id", "--vocab video_id: expected FIELD=N"),
    ("video_id=abc", "--vocab video_id=abc: expected a positive integer size, got 'abc'"),
    ("video_id=0", "expected a positive integer size, got 0"),
    ("video_id=1.5", "expected a positive integer size, got 1.5"),
    ("video_id=true", "expected a positive integer size, got True"),
])
def test_bad_vocab_items_are_named(item, match):
    with pytest.raises(ConfigError, match=match):
        parse_vocab([item])


def test_generate_prints_the_reference_recalls_it_records(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="cascadelab")
    generate_job.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["generate", "--out", str(tmp_path / "d"), "--days", "2", "--requests-per-day", "64"])
    assert run_main(args.func, args) == 0
    o = DatasetMeta.read(tmp_path / "d").extra["oracle"]["two_stage"]["overall"]
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"joint R@10@20 of the logged candidates ranked by the noise-free utility (oracle) {o['oracle']:.4f}, "
        f"affinity only {o['affinity']:.4f}, popularity only {o['popularity']:.4f}, random {o['random']:.4f}")
    assert o["requests"] == 128 and o["oracle"] > o["popularity"] > o["random"]


@pytest.mark.parametrize("flag", ["--popularity-skew", "--funnel-noise", "--item-spread"])
def test_a_negative_difficulty_knob_is_refused_before_anything_is_written(tmp_path, flag):
    parser = argparse.ArgumentParser(prog="cascadelab")
    generate_job.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["generate", "--out", str(tmp_path / "d"), flag, "-0.5"])
    with pytest.raises(ConfigError, match=f"{flag}.*expected values >= 0"):
        generate_job.main(args)
    assert not (tmp_path / "d").exists()
