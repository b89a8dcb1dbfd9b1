import math

import torch

from cascadelab.cascade.objectives.fs_ranknet import FSRankNetObjective, group_order_ranknet
from tests.cascade.objectives.toy import t, toy_batch


def sp(x: float) -> float:
    return math.log1p(math.exp(x))


def test_two_group_toy_by_hand():
    # groups of 2: {0, 1} above {2, 3}; slot 3 is padding and must not act as a negative
    batch = toy_batch([[True, True, True, False]], [[29.0, 28.0, 7.0, 7.0]])
    s = t([[1.0, -0.5, 0.25, 9.0]])
    out = FSRankNetObjective(1)([s], batch)
    want = (sp(0.25 - 1.0) + sp(0.25 + 0.5)) / 2  # pairs (0, 2), (1, 2); softplus(-(s_i - s_j))
    assert math.isclose(out.loss.item(), want, rel_tol=1e-9)
    assert math.isclose(out.components["fs_ranknet_ranking"].item(), want, rel_tol=1e-9)


def test_each_level_normalised_by_its_own_pairs():
    # three groups of one slot, two requests (the second has group 2 padded): level 0 pairs
    # (0,1),(0,2) of request 0 and (0,1) of request 1; level 1 pair (1,2) of request 0 only.
    mask = torch.tensor([[True, True, True], [True, True, False]])
    s = t([[2.0, 1.0, 0.0], [0.0, 1.0, 5.0]])
    level0 = (sp(1.0 - 2.0) + sp(0.0 - 2.0) + sp(1.0 - 0.0)) / 3
    level1 = sp(0.0 - 1.0)
    got = group_order_ranknet(s, torch.arange(3), mask)
    assert math.isclose(got.item(), level0 + level1, rel_tol=1e-9)


def test_stages_are_summed():
    batch = toy_batch([[True, True, True, True]], [[29.0, 28.0, 7.0, 7.0]])
    s1, s2 = t([[1.0, 0.0, 0.0, 2.0]]), t([[0.0, 3.0, 1.0, 1.0]])
    out = FSRankNetObjective(2)([s1, s2], batch)
    group = batch.group_index()
    want = group_order_ranknet(s1, group, batch.mask) + group_order_ranknet(s2, group, batch.mask)
    assert torch.allclose(out.loss, want)
    assert set(out.components) == {"fs_ranknet_retrieval", "fs_ranknet_ranking"}
