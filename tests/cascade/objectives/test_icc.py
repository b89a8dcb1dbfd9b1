import math

import torch

from cascadelab.cascade.objectives.icc import ICCObjective, icc_fused_score, pairwise_logistic
from tests.cascade.objectives.toy import t, toy_batch


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_two_stage_gates_and_fused_score_by_hand():
    s_r, s_p = [3.0, 1.0, 2.0, 0.0], [0.5, 2.0, 1.0, 4.0]
    mask = torch.ones(1, 4, dtype=torch.bool)
    e = icc_fused_score([t([s_r]), t([s_p])], [2, 1], mask, temperature=1.0, stage_scale=1.0)
    # kappa_r = (2nd + 3rd largest s_r) / 2 = 1.5, kappa_p = (1st + 2nd largest s_p) / 2 = 3
    want = [(1 - sig(r - 1.5)) * r + sig(r - 1.5) * sig(p - 3) * p for r, p in zip(s_r, s_p, strict=True)]
    assert torch.allclose(e, t([want]))


def test_three_stage_fused_score_by_hand_and_padding_is_ignored():
    s_r, s_p, s_k = [3.0, 1.0, 2.0, 0.0], [0.5, 2.0, 1.0, 4.0], [1.0, -1.0, 2.0, 0.0]
    kr, kp, kk = 1.5, 1.5, 1.5  # midpoints: s_r (2, 1), s_p (2, 1), s_k (2, 1)
    want = [(1 - sig(r - kr)) * r + 2 * sig(r - kr) * (1 - sig(p - kp)) * p
            + 4 * sig(r - kr) * sig(p - kp) * sig(k - kk) * k for r, p, k in zip(s_r, s_p, s_k, strict=True)]
    # a padded 5th candidate with the top score everywhere must not move any cut
    mask = torch.tensor([[True, True, True, True, False]])
    e = icc_fused_score([t([s_r + [9.0]]), t([s_p + [9.0]]), t([s_k + [9.0]])], [2, 2, 1], mask, 1.0, 2.0)
    assert torch.allclose(e[:, :4], t([want]))


def test_near_hard_gates_select_the_cascade():
    # T -> 0: retrieval keeps {0, 2} (cut 1.75); ranking's cut is its own global top-1 (item 0, cut 4.5).
    # Item 0 passes both (e = s_p), item 2 passes retrieval only (e = 0), items 1, 3 are cut (e = s_r).
    mask = torch.ones(1, 4, dtype=torch.bool)
    e = icc_fused_score([t([[3.0, 1.0, 2.5, 0.0]]), t([[5.0, 2.0, 1.0, 4.0]])], [2, 1], mask, 1e-4, 1.0)
    assert torch.allclose(e, t([[5.0, 1.0, 0.0, 0.0]]), atol=1e-6)


def test_pairwise_drops_ties_and_padding():
    e = t([[2.0, 1.0, 0.5, 7.0]])
    label = t([[3.0, 1.0, 1.0, 0.0]])
    mask = torch.tensor([[True, True, True, False]])
    want = (math.log1p(math.exp(-(2.0 - 1.0))) + math.log1p(math.exp(-(2.0 - 0.5)))) / 2  # pairs (0,1), (0,2)
    assert math.isclose(pairwise_logistic(e, label, mask).item(), want, rel_tol=1e-9)


def test_objective_is_pairwise_loss_of_fused_score():
    batch = toy_batch([[True, True, True, True]], [[29.0, 28.0, 7.0, 5.0]])
    scores = [t([[3.0, 1.0, 2.0, 0.0]]), t([[0.5, 2.0, 1.0, 4.0]])]
    out = ICCObjective(2, ks=[2, 1], icc_temperature=1.0)(scores, batch)
    e = icc_fused_score(scores, [2, 1], batch.mask, 1.0, 1.0)
    assert torch.allclose(out.loss, pairwise_logistic(e, batch.label, batch.mask))
    assert set(out.components) == {"icc_pairwise"}


def test_gates_are_the_dftopk_mask_including_short_requests():
    from cascadelab.operators import SATURATION_MARGIN, dftopk

    # row 1 has 2 valid candidates for a cut of 3: both pass, the weaker at logit +SATURATION_MARGIN
    s_r = t([[3.0, 1.0, 2.0, 0.0], [1.0, 4.0, 9.0, 9.0]])
    s_p = t([[0.5, 2.0, 1.0, 4.0], [2.0, 1.0, 9.0, 9.0]])
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    e = icc_fused_score([s_r, s_p], [3, 1], mask, temperature=1.0, stage_scale=1.0)
    g_r, g_p = dftopk(s_r, 3, 1.0, mask=mask), dftopk(s_p, 1, 1.0, mask=mask)
    assert torch.allclose(e, (1 - g_r) * s_r + g_r * g_p * s_p)
    assert math.isclose(g_r[1, 0].item(), sig(SATURATION_MARGIN), rel_tol=1e-12)
