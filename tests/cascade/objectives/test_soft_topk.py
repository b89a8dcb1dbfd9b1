import math

import pytest
import torch

from cascadelab.cascade.objectives import build_objective
from cascadelab.operators import lapsum_topk, sparse_topk
from tests.cascade.helpers import random_batch

NAMES = ["dftopk", "lapsum", "sparse-topk"]


@pytest.mark.parametrize("name", NAMES)
def test_total_is_weighted_stages_plus_joint(name):
    batch = random_batch(b=3, seed=1)
    torch.manual_seed(1)
    scores = [torch.randn(3, 40) * 3 for _ in range(2)]
    out = build_objective(name, 2, {"tau": 1.0})(scores, batch)
    prefix = name.replace("-", "_")
    stages = out.components[f"{prefix}_retrieval"] + out.components[f"{prefix}_ranking"]
    assert math.isclose(out.loss.item(), 0.5 * stages.item() + out.components[f"{prefix}_joint"].item(),
                        rel_tol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_padding_changes_nothing(name):
    batch = random_batch(b=2, seed=2, pad_prob=0.0)
    torch.manual_seed(2)
    scores = [torch.randn(2, 40) for _ in range(2)]
    base = build_objective(name, 2, {"tau": 1.0})(scores, batch).components
    # the same requests with 10 extra padded slots that score above everything
    batch.mask = torch.cat([batch.mask, torch.zeros(2, 10, dtype=torch.bool)], 1)
    batch.label = torch.cat([batch.label, torch.zeros(2, 10)], 1)
    batch.items = torch.cat([batch.items, torch.zeros(2, 10, 8, dtype=torch.long)], 1)
    padded = build_objective(name, 2, {"tau": 1.0})([torch.cat([s, s.new_full((2, 10), 50.0)], 1) for s in scores],
                                                    batch).components
    for key, value in base.items():
        assert math.isclose(value.item(), padded[key].item(), rel_tol=1e-5, abs_tol=1e-6), key


def test_lapsum_and_sparse_stage_losses_are_bce_of_the_operator():
    batch = random_batch(b=2, seed=3, pad_prob=0.0)
    s = torch.randn(2, 40, generator=torch.Generator().manual_seed(3)) * 2
    y = batch.ground_truth().float()
    for name, p in (("lapsum", lapsum_topk(s, 10, 5.0)), ("sparse-topk", sparse_topk(s, 10, l=1.0))):
        out = build_objective(name, 1, {})([s], batch)
        want = -(y * torch.log(p + 1e-6) + (1 - y) * torch.log(1 - p + 1e-6)).mean()
        assert math.isclose(out.components[f"{name.replace('-', '_')}_ranking"].item(), want.item(), rel_tol=1e-5)
