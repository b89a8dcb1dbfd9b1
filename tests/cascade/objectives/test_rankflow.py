import math

import pytest

from cascadelab.cascade.objectives.rankflow import RankFlowObjective
from tests.cascade.objectives.toy import t, toy_batch


def bce(z: float, y: float) -> float:
    return math.log1p(math.exp(z)) - y * z


def test_two_stage_terms_by_hand():
    # GT = items 0, 1; retrieval keeps its top-2 {0, 2}; ranking's top-1 inside that is item 2
    batch = toy_batch([[True, True, True, True]], [[29.0, 28.0, 7.0, 5.0]])
    s_r, s_p = [2.0, -1.0, 1.0, 0.0], [0.5, 3.0, 1.5, -2.0]
    out = RankFlowObjective(2, ks=[2, 1], rankflow_alpha=0.25)([t([s_r]), t([s_p])], batch)
    c = {k: v.item() for k, v in out.components.items()}
    ys = [1, 1, 0, 0]
    assert math.isclose(c["rankflow_bce_retrieval"], sum(bce(s, y) for s, y in zip(s_r, ys, strict=True)) / 4)
    assert math.isclose(c["rankflow_bce_ranking"], (bce(0.5, 1) + bce(1.5, 0)) / 2)  # only on {0, 2}
    assert math.isclose(c["rankflow_mse_retrieval"], ((0.5 - 2.0) ** 2 + (1.5 - 1.0) ** 2) / 2)
    # rank: mean s_r over ranking's choice {2} minus over the rest {0}
    assert math.isclose(c["rankflow_rank_retrieval"], -math.log(1 / (1 + math.exp(-(1.0 - 2.0)))))
    want = c["rankflow_bce_retrieval"] + c["rankflow_bce_ranking"] + 0.75 * c["rankflow_mse_retrieval"] \
        + 0.25 * c["rankflow_rank_retrieval"]
    assert math.isclose(out.loss.item(), want, rel_tol=1e-9)


def test_reference_weights_by_depth():
    two = RankFlowObjective(2)
    three = RankFlowObjective(3)
    assert (two.w_mse, two.w_rank) == (1.0, 0.0) and (three.w_mse, three.w_rank) == (1.0, 1.0)
    assert two.ks == [30, 20] and three.ks == [40, 30, 20]
    with pytest.raises(ValueError, match="rankflow_alpha"):
        RankFlowObjective(2, rankflow_alpha=1.5)


def test_three_stage_has_seven_terms_summed():
    batch = toy_batch([[True] * 6], [[29.0, 28.0, 8.0, 7.0, 6.0, 5.0]])
    scores = [t([[3.0, 2.0, 1.0, 0.0, -1.0, -2.0]]), t([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]]),
              t([[1.0, 0.0, 1.0, 0.0, 1.0, 0.0]])]
    out = RankFlowObjective(3, ks=[4, 3, 2])(scores, batch)
    assert len(out.components) == 7
    assert math.isclose(out.loss.item(), sum(v.item() for v in out.components.values()), rel_tol=1e-9)
