import math

import pytest
import torch

from cascadelab.cascade.objectives import build_objective
from cascadelab.cascade.objectives.lcron import LCRONObjective
from tests.cascade.objectives.toy import t, toy_batch

L = -math.log(1e-6)  # the loss of a membership that is exactly 0


def _case(padded: bool):
    # groups of 2 slots: items 0, 1 are the ground truth, items 2, 3 negatives; quota gt_k = 2.
    # retrieval's top-2 = {0, 2}, ranking's top-2 = {1, 2}; an optional padded 5th slot scores highest.
    s_r, s_p = [4.0, 1.0, 3.0, 2.0], [1.0, 4.0, 3.0, 2.0]
    mask = [[True] * 4 + [False] * padded]
    label = [[29.0, 28.0, 7.0, 7.0] + [30.0] * padded]
    extra = [50.0] * padded
    return [t([s_r + extra]), t([s_p + extra])], toy_batch(mask, label)


@pytest.mark.parametrize("padded", [False, True])
def test_single_and_e2e_by_hand_with_near_hard_neuralsort(padded):
    scores, batch = _case(padded)
    out = LCRONObjective(2, gt_k=2, lcron_tau=1e-3)(scores, batch)
    c = out.components
    # L_single(r): GT item 1 is outside r's top-2 (pi = 0), negative 2 is inside (beta = 0) -> 2 L / 4
    assert math.isclose(c["lcron_single_retrieval"].item(), 2 * L / 4, rel_tol=1e-6)
    # L_single(p): GT item 0 outside, negative 2 inside -> 2 L / 4
    assert math.isclose(c["lcron_single_ranking"].item(), 2 * L / 4, rel_tol=1e-6)
    # L_e2e: each GT item misses one stage (pi_r pi_p = 0); negative 2 passes both
    # (1 - (1 - beta_r)(1 - beta_p) = 0), negative 3 passes neither (= 1, no loss) -> 3 L / 4
    assert math.isclose(c["lcron_e2e"].item(), 3 * L / 4, rel_tol=1e-6)
    # uncertainty weights at w = 1: L = L_single(r) / 2 + L_single(p) / 2 + L_e2e
    assert math.isclose(out.loss.item(), 2 * L / 4 + 3 * L / 4, rel_tol=1e-6)
    assert c["lcron_weight_retrieval"].item() == 1.0


def test_a_perfect_cascade_costs_nothing():
    scores = [t([[4.0, 3.0, 1.0, 2.0]]), t([[3.0, 4.0, 2.0, 1.0]])]
    _, batch = _case(False)
    out = LCRONObjective(2, gt_k=2, lcron_tau=1e-3)(scores, batch)
    assert abs(out.loss.item()) < 1e-5


@pytest.mark.parametrize("name, params, tol", [
    ("lcron-softsort", {"lcron_tau": 1e-3}, 1e-6),
    ("lcron-diffsort", {"diffsort_steepness": 1e9}, 1e-3),
])
def test_other_sort_operators_agree_when_near_hard(name, params, tol):
    scores, batch = _case(True)
    out = build_objective(name, 2, {"gt_k": 2, **params})(scores, batch)
    assert math.isclose(out.components["lcron_e2e"].item(), 3 * L / 4, rel_tol=tol)
    assert math.isclose(out.components["lcron_single_ranking"].item(), 2 * L / 4, rel_tol=tol)


def test_requests_without_more_candidates_than_the_quota_are_skipped():
    scores, batch = _case(False)
    batch.mask[0, 2:] = False  # 2 valid candidates = the quota: nothing to select, no loss
    out = LCRONObjective(2, gt_k=2, lcron_tau=1e-3)(scores, batch)
    assert out.components["lcron_e2e"].item() == 0.0 and out.components["lcron_single_ranking"].item() == 0.0


def test_stage_quotas_use_the_cascade_cut_offs():
    obj = build_objective("lcron", 3, {"lcron_stage_quotas": True}, ks=[40, 30, 20])
    assert obj.quotas == [40, 30, 20]
    assert build_objective("lcron", 3, {}, ks=[40, 30, 20]).quotas == [10, 10, 10]
    assert torch.is_tensor(obj.weights.log_var) and obj.weights.log_var.shape == (3,)
