import pytest
import torch

from cascadelab.cascade.models import MODELS, build_model
from cascadelab.cascade.models.embedding import masked_mean
from tests.cascade.helpers import VOCAB, random_batch


@pytest.mark.parametrize("name", sorted(MODELS))
def test_output_shape_and_gradients(name):
    torch.manual_seed(0)
    model = build_model(name, VOCAB, emb_dim=4, hidden=16)
    batch = random_batch(b=3, groups=4)
    out = model(batch)
    assert out.shape == (3, 40) and torch.isfinite(out).all()
    out.sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_tables_are_sized_from_vocabulary():
    model = build_model("dssm", {**VOCAB, "video_id": 1000}, emb_dim=4)
    small = build_model("dssm", VOCAB, emb_dim=4)
    assert model.emb.item.table.num_embeddings - small.emb.item.table.num_embeddings == 700
    with pytest.raises(ValueError, match="missing size for field 'author_id'"):
        build_model("din", {k: v for k, v in VOCAB.items() if k != "author_id"})


def test_masked_mean_ignores_padding():
    x = torch.tensor([[[1.0], [3.0], [100.0]], [[5.0], [7.0], [9.0]]])
    m = torch.tensor([[True, True, False], [False, False, False]])
    assert masked_mean(x, m).squeeze(-1).tolist() == [2.0, 0.0]


def test_din_ignores_padded_behaviour():
    torch.manual_seed(0)
    model = build_model("din", VOCAB, emb_dim=4, hidden=16)
    batch = random_batch(b=2)
    before = model(batch)
    batch.seq[~batch.seq_mask] = 7  # change only padded positions
    assert torch.allclose(before, model(batch))
