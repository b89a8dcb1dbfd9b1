"""Every public operator rejects bad input with a ValueError that names the argument."""

from __future__ import annotations

import math

import pytest
import torch

from cascadelab.operators import (
    dftopk,
    dftopk_logits,
    diff_sort,
    hard_topk_mask,
    lapsum_topk,
    neural_sort,
    soft_sort,
    sparse_topk,
)

GOOD = torch.randn(3, 6)

# (name, callable(scores, k, hp), hyperparameter name or None, takes k, takes mask)
OPS = [
    ("dftopk", lambda s, k=2, hp=1.0, mask=None: dftopk(s, k, hp, mask=mask), "tau", True, True),
    ("dftopk_logits", lambda s, k=2, hp=1.0, mask=None: dftopk_logits(s, k, hp, mask=mask), "tau", True, True),
    ("lapsum", lambda s, k=2, hp=1.0, mask=None: lapsum_topk(s, k, hp), "alpha", True, False),
    ("sparse", lambda s, k=2, hp=1.0, mask=None: sparse_topk(s, k, hp), "l", True, False),
    ("hard", lambda s, k=2, hp=None, mask=None: hard_topk_mask(s, k, mask=mask), None, True, True),
    ("neural_sort", lambda s, k=None, hp=1.0, mask=None: neural_sort(s, hp), "tau", False, False),
    ("soft_sort", lambda s, k=None, hp=1.0, mask=None: soft_sort(s, hp), "tau", False, False),
    ("diff_sort", lambda s, k=None, hp=1.0, mask=None: diff_sort(s, hp), "steepness", False, False),
]
IDS = [o[0] for o in OPS]


@pytest.mark.parametrize("op", OPS, ids=IDS)
def test_good_input_runs(op):
    _, fn, _, _, _ = op
    assert fn(GOOD.clone()).shape[:2] == (3, 6)


@pytest.mark.parametrize("op", OPS, ids=IDS)
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "scalar", "empty", "empty_rows", "int", "list"])
def test_bad_scores(op, bad):
    _, fn, _, _, _ = op
    s = GOOD.clone()
    if bad == "nan":
        s[1, 2] = math.nan
    elif bad == "inf":
        s[0, 0] = math.inf
    elif bad == "-inf":
        s[2, 5] = -math.inf
    elif bad == "scalar":
        s = torch.tensor(1.0)
    elif bad == "empty":
        s = torch.empty(3, 0)
    elif bad == "empty_rows":
        s = torch.empty(0, 6)
    elif bad == "int":
        s = torch.arange(18).reshape(3, 6)
    else:
        s = [[1.0, 2.0, 3.0]]
    with pytest.raises(ValueError, match="'scores'"):
        fn(s)


@pytest.mark.parametrize("op", [o for o in OPS if o[3]], ids=[o[0] for o in OPS if o[3]])
@pytest.mark.parametrize("k", [0, -1, torch.tensor([1, 0, 2]), torch.tensor([2, 2]), "3", None, True])
def test_bad_k(op, k):
    _, fn, _, _, _ = op
    with pytest.raises(ValueError, match="'k'"):
        fn(GOOD.clone(), k=k)


@pytest.mark.parametrize("op", [o for o in OPS if o[0] in ("dftopk", "dftopk_logits", "hard")],
                         ids=["dftopk", "dftopk_logits", "hard"])
@pytest.mark.parametrize("k", [2.5, torch.tensor([1.0, 2.0, 3.0])])
def test_integer_k_required(op, k):
    _, fn, _, _, _ = op
    with pytest.raises(ValueError, match="'k'"):
        fn(GOOD.clone(), k=k)


@pytest.mark.parametrize("op", [o for o in OPS if o[2]], ids=[o[0] for o in OPS if o[2]])
@pytest.mark.parametrize("value", [0.0, -1.0, math.nan, math.inf, -math.inf, "1", None, torch.ones(2)])
def test_bad_hyperparameter(op, value):
    _, fn, hp_name, _, _ = op
    with pytest.raises(ValueError, match=f"'{hp_name}'"):
        fn(GOOD.clone(), hp=value)


@pytest.mark.parametrize("op", [o for o in OPS if o[4]], ids=[o[0] for o in OPS if o[4]])
@pytest.mark.parametrize("mask", [torch.ones(3, 5, dtype=torch.bool), torch.ones(6, dtype=torch.bool),
                                  torch.ones(3, 6), "all"])
def test_bad_mask(op, mask):
    _, fn, _, _, _ = op
    with pytest.raises(ValueError, match="'mask'"):
        fn(GOOD.clone(), mask=mask)


def test_diff_sort_bad_options():
    with pytest.raises(ValueError, match="'network'"):
        diff_sort(GOOD, 1.0, network="merge")
    with pytest.raises(ValueError, match="'relaxation'"):
        diff_sort(GOOD, 1.0, relaxation="optimal")


@pytest.mark.parametrize("numel", [1, 7, 1 << 16])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "inf-inf"])
def test_check_scores_finds_any_non_finite(numel, where, bad):
    from cascadelab.operators._checks import check_scores

    s = torch.randn(numel)
    i = {"first": 0, "middle": numel // 2, "last": numel - 1}[where]
    if bad == "inf-inf":  # both extrema non-finite
        s[0], s[-1] = math.inf, -math.inf
    else:
        s[i] = bad
    with pytest.raises(ValueError, match="'scores' contains NaN or inf"):
        check_scores(s)


@pytest.mark.parametrize("dtype,big", [(torch.float64, 1.7e308), (torch.float32, 3.4e38), (torch.float16, 6.0e4),
                                       (torch.bfloat16, 3.0e38)])
def test_check_scores_accepts_finite_extremes_and_returns_the_input(dtype, big):
    from cascadelab.operators._checks import check_scores

    s = torch.tensor([[big, -big, 0.0], [big, big, -big]], dtype=dtype)  # finite; any sum of them overflows
    assert torch.isfinite(s).all()
    assert check_scores(s) is s
