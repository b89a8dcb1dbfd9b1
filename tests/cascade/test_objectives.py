import pytest
import torch

from cascadelab.cascade.cascade import Cascade
from cascadelab.cascade.metrics import finalize, metric_sums
from cascadelab.cascade.objectives import OBJECTIVES, build_objective
from tests.cascade.helpers import VOCAB, random_batch


def _cascade(objective: str, **params) -> Cascade:
    torch.manual_seed(0)
    return Cascade(["dssm", "din"], [30, 20], VOCAB, objective, params, emb_dim=4, hidden=16)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_finite_with_gradients_into_every_stage(name):
    model = _cascade(name)
    batch = random_batch(b=4)
    _, out = model(batch)
    assert torch.isfinite(out.loss) and out.loss.ndim == 0
    assert out.components and all(torch.isfinite(v) and not v.requires_grad for v in out.components.values())
    out.loss.backward()
    for stage in model.stages:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in stage.parameters())


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_finite_on_all_padding_and_single_candidate_rows(name):
    model = _cascade(name)
    batch = random_batch(b=3)
    batch.mask[0] = False  # a request that is all padding
    batch.mask[1] = False
    batch.mask[1, 0] = True  # a request with a single valid candidate
    batch.label = batch.label * batch.mask
    _, out = model(batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    for p in model.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()


def test_dftopk_uses_uncertainty_weights():
    obj = build_objective("dftopk", 2, {"tau": 1.0, "gt_k": 10, "unused": 3})
    assert obj.weights.log_var.shape == (2,) and obj.tau == 1.0


def _learnable_batch(b: int = 64, seed: int = 0):
    """Ground truth shares an item attribute (category 1) so a model can learn to rank it first."""
    batch = random_batch(b=b, seed=seed, pad_prob=0.0)
    gt = batch.ground_truth()
    batch.items[..., 2] = torch.where(gt, torch.ones_like(batch.items[..., 2]),
                                      torch.randint(2, 21, batch.items[..., 2].shape,
                                                    generator=torch.Generator().manual_seed(seed)))
    return batch


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_training_raises_joint_recall(name):
    torch.manual_seed(0)
    model = _cascade(name, tau=1.0)
    batch = _learnable_batch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def recall():
        with torch.no_grad():
            return finalize(metric_sums(model.scores(batch), [30, 20], batch))["joint_recall"]

    before = recall()
    for _ in range(60):
        _, out = model(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    after = recall()
    assert after > before + 0.2 and after > 0.9, (before, after)
