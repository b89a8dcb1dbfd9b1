"""Registry: names, defaults, dispatch and the error for unknown names."""

from __future__ import annotations

import pytest
import torch

from cascadelab.operators import OPERATORS, OperatorSpec, available_operators, dftopk, get_operator

EXPECTED = {
    "dftopk": ("topk", {"tau": 500.0}),
    "lapsum": ("topk", {"alpha": 5.0}),
    "neuralsort": ("permutation", {"tau": 50.0}),
    "softsort": ("permutation", {"tau": 50.0}),
    "diffsort": ("permutation", {"steepness": 10.0}),
    "sparse-topk": ("topk", {"l": 1.0}),
}


def test_names_kinds_and_defaults():
    assert available_operators() == sorted(EXPECTED)
    for name, (kind, hp) in EXPECTED.items():
        spec = get_operator(name)
        assert isinstance(spec, OperatorSpec) and spec.name == name and spec.kind == kind
        assert dict(spec.hyperparams) == hp
    assert set(OPERATORS) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_spec_call_shapes(name):
    spec = get_operator(name)
    s = torch.randn(2, 3, 8)
    out = spec(s, k=3) if spec.kind == "topk" else spec(s)
    assert out.shape == ((2, 3, 8) if spec.kind == "topk" else (2, 3, 8, 8))
    assert torch.isfinite(out).all()


def test_spec_overrides_and_errors():
    s = torch.randn(4, 6)
    spec = get_operator("dftopk")
    torch.testing.assert_close(spec(s, k=2, tau=0.5), dftopk(s, 2, 0.5))
    with pytest.raises(ValueError, match="temperature"):
        spec(s, k=2, temperature=1.0)
    with pytest.raises(ValueError, match="'k'"):
        spec(s)
    with pytest.raises(ValueError, match="'k'"):
        get_operator("neuralsort")(s, k=2)


@pytest.mark.parametrize("bad", ["dftopK", "neural_sort", "", None])
def test_unknown_name_lists_valid_names(bad):
    with pytest.raises(ValueError) as err:
        get_operator(bad)
    assert repr(bad) in str(err.value)
    assert all(name in str(err.value) for name in EXPECTED)
