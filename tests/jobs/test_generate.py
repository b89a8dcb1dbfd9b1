"""``cascadelab generate --vocab FIELD=N``: sizes parsed like ``--set`` values, bad input named in one line."""

import pytest

from cascadelab.jobs.generate import parse_vocab
from cascadelab.platform.config import ConfigError


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
