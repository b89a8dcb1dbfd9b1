import math

import pytest
import torch

from cascadelab.cascade.objectives.arf import ARFObjective, ARFv2Objective
from cascadelab.cascade.objectives.sorting import label_permutation, memberships
from tests.cascade.objectives.toy import t, toy_batch

L = -math.log(1e-6)


def test_label_permutation_spreads_ties_and_skips_padding():
    label = t([[3.0, 1.0, 1.0, 0.0, 9.0]])
    mask = torch.tensor([[True, True, True, True, False]])
    lam = label_permutation(label, mask)[0]  # [position, item]
    want = torch.zeros(5, 5, dtype=torch.float64)
    want[0, 0] = 1.0
    want[1:3, 1:3] = 0.5  # the tie block {1, 2} over positions 1, 2
    want[3, 3] = 1.0
    assert torch.allclose(lam, want)


def test_memberships_normalise_by_detached_column_mass():
    perm = t([[[0.5, 0.5, 0.0], [0.5, 0.25, 0.25], [0.0, 0.25, 0.75]]]).requires_grad_()
    pi, beta = memberships(perm, 1, torch.ones(1, 3, dtype=torch.bool), eps=0.0)
    assert torch.allclose(pi, t([[0.5, 0.5, 0.0]])) and torch.allclose(beta, t([[0.5, 0.5, 1.0]]))
    pi[0, 0].backward()  # d pi_0 / d P[k, 0] = [k < 1] / col_0: only the top row, col_0 = 1
    assert torch.allclose(perm.grad[0, :, 0], t([[1.0, 0.0, 0.0]])[0])


@pytest.mark.parametrize("cls", [ARFObjective, ARFv2Objective])
def test_global_and_relaxed_terms_by_hand(cls):
    # groups of 2: GT = items 0, 1. Labels 29, 28, 7, 5 (no ties). One stage, m = 2, near-hard NeuralSort.
    batch = toy_batch([[True, True, True, True]], [[29.0, 28.0, 7.0, 5.0]])
    s = t([[4.0, 1.0, 3.0, 2.0]])  # model order 0, 2, 3, 1; label order 0, 1, 2, 3
    out = cls(1, ks=[2], arf_tau=1e-3)([s], batch)
    prefix = "arf" if cls is ARFObjective else "arf_v2"
    # global: items 1, 2, 3 sit at the wrong position -> 3 L / c^2
    assert math.isclose(out.components[f"{prefix}_global_ranking"].item(), 3 * L / 16, rel_tol=1e-6)
    relax = out.components[f"{prefix}_relax_ranking"].item()
    if cls is ARFObjective:  # -ln(top-2 mass / 2 + eps) on GT: item 0 ln 2, item 1 L
        assert math.isclose(relax, (math.log(2) + L) / 4, rel_tol=1e-5)
    else:  # GT item 1 outside (pi = 0), negative item 2 inside (beta = 0)
        assert math.isclose(relax, 2 * L / 4, rel_tol=1e-6)
    assert math.isclose(out.loss.item(), 0.5 * 3 * L / 16 + relax, rel_tol=1e-6)
