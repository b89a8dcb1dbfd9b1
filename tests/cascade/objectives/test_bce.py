import math

import torch
import torch.nn.functional as F

from cascadelab.cascade.objectives.bce import BCEObjective
from tests.cascade.objectives.toy import toy_batch


def _three_stage_batch():
    # 5 groups of 2 slots (rerank_pos, rerank_neg, rank_neg, coarse_neg, prerank_neg); slot 3 padded
    mask = [[True, True, True, False, True, True, True, True, True, True]]
    label = [[29.0, 28.0, 8.0, 8.0, 7.0, 7.0, 6.0, 6.0, 5.0, 5.0]]
    return toy_batch(mask, label)


def test_three_stage_scopes():
    batch = _three_stage_batch()
    torch.manual_seed(0)
    scores = [torch.randn(1, 10, dtype=torch.float64) for _ in range(3)]
    out = BCEObjective(3)(scores, batch)
    y = batch.ground_truth().to(torch.float64)

    def mean_bce(s, slots):
        return sum(F.binary_cross_entropy_with_logits(s[0, j], y[0, j]).item() for j in slots) / len(slots)

    assert math.isclose(out.components["bce_ranking"].item(), mean_bce(scores[2], [0, 1, 2]), rel_tol=1e-9)
    assert math.isclose(out.components["bce_prerank"].item(), mean_bce(scores[1], [0, 1, 2, 4, 5, 6, 7]),
                        rel_tol=1e-9)  # every group but prerank_neg
    assert math.isclose(out.components["bce_retrieval"].item(), mean_bce(scores[0], [0, 1, 2, 4, 5, 6, 7, 8, 9]),
                        rel_tol=1e-9)
    assert math.isclose(out.loss.item(), sum(v.item() for v in out.components.values()), rel_tol=1e-9)


def test_two_stage_last_stage_on_first_two_groups():
    batch = toy_batch([[True] * 8], [[29.0, 28.0, 7.0, 7.0, 6.0, 6.0, 5.0, 5.0]])
    s = torch.zeros(1, 8, dtype=torch.float64)
    moved = s.clone()
    moved[0, 4:] = 5.0  # groups 2 and 3 do not reach the ranking loss
    a = BCEObjective(2)([s, s], batch).components
    b = BCEObjective(2)([s, moved], batch).components
    assert a["bce_ranking"] == b["bce_ranking"]
    assert BCEObjective(2, bce_last_stage_groups=4)([s, moved], batch).components["bce_ranking"] != a["bce_ranking"]
