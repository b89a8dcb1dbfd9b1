import pytest
import torch

from cascadelab.cascade.negatives import sample_in_batch_negatives
from tests.cascade.helpers import random_batch


def _tagged_batch(b: int = 6, pad_prob: float = 0.3):
    """Item id field 0 encodes (request, slot) so every sampled candidate can be traced back."""
    batch = random_batch(b=b, pad_prob=pad_prob, seed=4)
    tag = torch.arange(b).unsqueeze(1) * 1000 + torch.arange(batch.n).unsqueeze(0) + 1
    batch.items[..., 0] = torch.where(batch.mask, tag, torch.zeros_like(tag))
    return batch


def test_shape_labels_and_mask():
    batch = _tagged_batch()
    out = sample_in_batch_negatives(batch, 25, torch.Generator().manual_seed(0))
    assert out.items.shape == (6, 65, 8) and out.mask.shape == (6, 65) and out.label.shape == (6, 65)
    assert torch.equal(out.items[:, :40], batch.items) and torch.equal(out.mask[:, :40], batch.mask)
    assert out.mask[:, 40:].all() and (out.label[:, 40:] == 0).all()
    assert torch.equal(out.ground_truth()[:, :40], batch.ground_truth()) and not out.ground_truth()[:, 40:].any()
    assert out.user is batch.user and out.slots_per_group == batch.slots_per_group


def test_never_own_request_never_padding_never_twice():
    batch = _tagged_batch()
    out = sample_in_batch_negatives(batch, 30, torch.Generator().manual_seed(1))
    tags = out.items[:, 40:, 0]
    owner, slot = (tags - 1) // 1000, (tags - 1) % 1000
    assert (tags > 0).all()  # padded slots carry tag 0
    assert (owner != torch.arange(6).unsqueeze(1)).all()
    assert batch.mask[owner, slot].all()
    assert all(len(set(row.tolist())) == 30 for row in tags)
    assert torch.equal(out.items[:, 40:, 1:], batch.items[owner, slot][..., 1:])


def test_uniform_over_foreign_candidates():
    batch = _tagged_batch(b=3, pad_prob=0.0)
    g = torch.Generator().manual_seed(2)
    counts = torch.zeros(3 * 40)
    for _ in range(200):
        tags = sample_in_batch_negatives(batch, 10, g).items[0, 40:, 0]
        counts.index_add_(0, tags - 1 - (tags - 1) // 1000 * 960, torch.ones(10))
    foreign = counts[40:]  # request 0 draws from requests 1 and 2 only, 80 candidates, 2000 draws
    assert counts[:40].sum() == 0 and foreign.min() > 5 and foreign.max() < 50


def test_too_few_foreign_candidates_pad_and_zero_is_identity():
    batch = _tagged_batch(b=2, pad_prob=0.0)
    batch.mask[1, 5:] = False
    out = sample_in_batch_negatives(batch, 8, torch.Generator().manual_seed(3))
    assert out.mask[0, 40:].sum() == 5  # request 1 has only 5 valid candidates
    assert (out.items[0, 40:][~out.mask[0, 40:]] == 0).all()
    assert out.mask[1, 40:].all()
    assert sample_in_batch_negatives(batch, 0) is batch
    with pytest.raises(ValueError, match="sample_num"):
        sample_in_batch_negatives(batch, -1)
    alone = sample_in_batch_negatives(random_batch(b=1), 4)
    assert not alone.mask[:, 40:].any()
