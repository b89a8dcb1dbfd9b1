"""The restricted streaming unpickler: same content as pickle.load (cut to max_rows), every protocol."""

from __future__ import annotations

import io
import pickle
import pickletools

import numpy as np
import pytest

from cascadelab.platform.data.schema import DataError
from cascadelab.platform.data.slimpickle import load_trimmed


def _sample():
    rng = np.random.default_rng(0)
    d = {np.int64(i): {"rank_pos": rng.integers(0, 100, (int(rng.integers(1, 30)), 8)),
                       "short": rng.integers(0, 9, (3, 8)), "empty": np.zeros((0, 8), np.int64)}
         for i in range(50)}
    d[np.int64(7)]["f32"] = np.ones((40, 8), np.float32)
    d[np.int64(8)]["fortran"] = np.asfortranarray(rng.integers(0, 9, (30, 8)))
    d[np.int64(9)]["vector"] = np.arange(25)
    d[np.int64(9)]["meta"] = ["a", 1, 2.5, None, True, (1, 2), b"xy"]
    return d


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_same_content_as_pickle_load_cut_to_max_rows(protocol):
    d = _sample()
    out = load_trimmed(io.BytesIO(pickle.dumps(d, protocol=protocol)), 10)
    assert list(out) == list(d) and all(type(k) is np.int64 for k in out)
    for k, stages in d.items():
        assert list(out[k]) == list(stages)
        for g, v in stages.items():
            if isinstance(v, np.ndarray):
                want = v[:10] if v.ndim == 2 else v
                assert out[k][g].dtype == v.dtype and np.array_equal(out[k][g], want)
            else:
                assert out[k][g] == v


def test_shared_small_objects_are_resolved_through_the_memo():
    a = np.arange(16).reshape(2, 8)
    out = load_trimmed(io.BytesIO(pickle.dumps({"x": a, "y": a, "s": ("k", "k")}, protocol=4)), 10)
    assert out["x"] is out["y"] and np.array_equal(out["x"], a)


def test_other_globals_are_refused():
    # Written by hand, not with pickle.dumps: once Ray has run in this process it replaces
    # builtins.print, and pickling print would then name Ray's replacement instead.
    evil = b"\x80\x02}q\x00X\x01\x00\x00\x00xcbuiltins\nprint\nX\x02\x00\x00\x00hi\x85Rs."
    assert [op.name for op, _, _ in pickletools.genops(evil)][-1] == "STOP"
    with pytest.raises(DataError, match="refers to 'builtins.print', expected only NumPy arrays"):
        load_trimmed(io.BytesIO(evil), 10)


def test_truncated_pickle_is_an_error():
    data = pickle.dumps(_sample(), protocol=4)
    with pytest.raises((DataError, ValueError)):
        load_trimmed(io.BytesIO(data[: len(data) // 2]), 10)
