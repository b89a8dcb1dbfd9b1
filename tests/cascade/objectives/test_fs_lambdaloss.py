import math

import pytest
import torch

from cascadelab.cascade.objectives.fs_lambdaloss import FSLambdaLossObjective, lambda_loss, lambda_weights
from tests.cascade.objectives.toy import t, toy_batch


def D(x: float) -> float:
    return 1.0 / math.log(1.0 + x)


LABEL = t([[2.0, 1.0, 0.0]])
SCORES = t([[0.1, 0.3, 0.2]])  # ranks: item 0 -> 3, item 1 -> 1, item 2 -> 2
MASK = torch.ones(1, 3, dtype=torch.bool)
IDCG = 2 * D(1) + 1 * D(2)


def test_three_item_weights_by_hand():
    f = 0.8
    w = lambda_weights(SCORES, LABEL, MASK, topn=30, smoothing=f)[0]
    # pair (0, 1): ranks 3, 1; pair (0, 2): ranks 3, 2; pair (1, 2): ranks 1, 2
    d01 = (1 - f) * abs(D(2) - D(3)) + f * abs(D(3) - D(1))
    d02 = (1 - f) * abs(D(1) - D(2)) + f * abs(D(3) - D(2))
    d12 = (1 - f) * abs(D(1) - D(2)) + f * abs(D(1) - D(2))
    want = torch.zeros(3, 3, dtype=torch.float64)
    want[0, 1] = (2 - 1) / IDCG * d01
    want[0, 2] = (2 - 0) / IDCG * d02
    want[1, 2] = (1 - 0) / IDCG * d12
    assert torch.allclose(w, want)  # only l_i > l_j pairs, each once


def test_topn_and_smoothing_cut_the_weights():
    w = lambda_weights(SCORES, LABEL, MASK, topn=1, smoothing=0.0)[0]
    # topn 1: only pairs touching rank 1 (item 1) keep a weight; f = 0: u alone
    assert w[0, 2] == 0
    assert math.isclose(w[0, 1].item(), 1 / IDCG * abs(D(2) - D(3)), rel_tol=1e-9)
    assert math.isclose(w[1, 2].item(), 1 / IDCG * abs(D(1) - D(2)), rel_tol=1e-9)


def test_loss_value_and_padding():
    w = lambda_weights(SCORES, LABEL, MASK, 30, 0.8)[0]
    s = SCORES[0].tolist()
    want = sum(w[i, j].item() * math.log1p(math.exp(-(s[i] - s[j]))) for i in range(3) for j in range(3))
    assert math.isclose(lambda_loss(SCORES, LABEL, MASK, 30, 0.8).item(), want, rel_tol=1e-9)
    # a padded 4th item with the best score and label changes nothing
    mask = torch.tensor([[True, True, True, False]])
    padded = lambda_loss(t([[0.1, 0.3, 0.2, 9.0]]), t([[2.0, 1.0, 0.0, 5.0]]), mask, 30, 0.8)
    assert math.isclose(padded.item(), want, rel_tol=1e-9)


def test_objective_sums_stages_and_validates():
    batch = toy_batch([[True, True, True]], [[2.0, 1.0, 0.0]])
    out = FSLambdaLossObjective(2)([SCORES, SCORES.flip(-1)], batch)
    want = lambda_loss(SCORES, batch.label, batch.mask, 30, 0.8) + lambda_loss(SCORES.flip(-1), batch.label,
                                                                               batch.mask, 30, 0.8)
    assert torch.allclose(out.loss, want)
    with pytest.raises(ValueError, match="lambdaloss"):
        FSLambdaLossObjective(2, lambdaloss_smoothing=2.0)
