import logging

import pytest
import torch
from torch import nn

from cascadelab.cascade.batch import CascadeBatch
from cascadelab.cascade.cascade import Cascade
from cascadelab.cascade.models import MODELS, build_model
from cascadelab.cascade.models.attention import (
    BLOCK_ELEMENTS,
    _blocks,
    _broadcast_logits,
    _row_spans,
    target_attention_logits,
)
from cascadelab.cascade.models.compiled import compile_stages
from cascadelab.cascade.models.embedding import (
    N_ITEM,
    N_SEQ,
    N_USER,
    CascadeEmbeddings,
    FieldEmbedding,
    masked_mean,
    mlp,
)
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


# ---------------------------------------------------------------------------------------------------------
# The fast paths against plain implementations: DIN's blocked target attention and the embedding lookup.
# ---------------------------------------------------------------------------------------------------------

TOL = {torch.float64: {"rtol": 1e-9, "atol": 1e-10}, torch.float32: {"rtol": 1e-4, "atol": 1e-5}}


def plain_lookup(field: FieldEmbedding, ids: torch.Tensor) -> torch.Tensor:
    """nn.Embedding's own lookup of the offset ids, fields concatenated."""
    return field.table(ids + field.offsets[: ids.shape[-1]]).flatten(-2)


def plain_attention(s, t, w, mask):
    """The [B, n, L, H] broadcast, materialised: mask * (relu(s + t) @ w)."""
    return (torch.relu(s.unsqueeze(1) + t.unsqueeze(2)) @ w) * mask.unsqueeze(1)


class PlainDIN(nn.Module):
    """DIN as a plain autograd graph over materialised tensors: the reference the fast DIN must equal."""

    def __init__(self, vocab, emb_dim=8, hidden=128):
        super().__init__()
        self.emb = CascadeEmbeddings(vocab, emb_dim)
        d = N_SEQ * emb_dim
        self.att_seq = nn.Linear(d, 2 * d)
        self.att_tgt = nn.Linear(d, 2 * d, bias=False)
        self.att_out = nn.Linear(2 * d, 1)
        self.scorer = mlp([N_USER * emb_dim + d + N_ITEM * emb_dim, hidden, hidden, 32, 1])

    def forward(self, batch):
        seq = plain_lookup(self.emb.item, batch.seq)  # [B, L, d]
        items = plain_lookup(self.emb.item, batch.items)  # [B, n, 8E]
        d = seq.shape[-1]
        hidden = torch.relu(self.att_seq(seq).unsqueeze(1) + self.att_tgt(items[..., :d]).unsqueeze(2))
        logits = self.att_out(hidden).squeeze(-1)  # [B, n, L]
        logits = logits.masked_fill(~batch.seq_mask.unsqueeze(1), float("-inf"))
        weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        interest = torch.einsum("bnl,bld->bnd", weights, seq)
        user = plain_lookup(self.emb.user, batch.user).unsqueeze(1).expand(-1, items.shape[1], -1)
        return self.scorer(torch.cat([user, interest, items], dim=-1)).squeeze(-1)


def _masks(b, length, seed):
    g = torch.Generator().manual_seed(seed)
    random = torch.rand(b, length, generator=g) > 0.4
    lengths = torch.randint(0, length + 1, (b,), generator=g)
    front = torch.arange(length) >= length - lengths[:, None]  # front padding, some rows empty
    return {"random": random, "front": front, "all": torch.ones(b, length, dtype=torch.bool),
            "none": torch.zeros(b, length, dtype=torch.bool)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1, 1, 3), (3, 5, 7, 4), (6, 40, 50, 8), (2, 1, 9, 5), (5, 3, 1, 6)])
@pytest.mark.parametrize("kind", ["random", "front", "all", "none"])
@pytest.mark.parametrize("budget", [1, 300, BLOCK_ELEMENTS])
def test_target_attention_matches_plain(dtype, shape, kind, budget):
    b, n, length, h = shape
    g = torch.Generator().manual_seed(sum(shape))
    s, t, w = (torch.randn(*size, generator=g, dtype=dtype) for size in [(b, length, h), (b, n, h), (h,)])
    mask = _masks(b, length, seed=b + n)[kind]
    upstream = torch.randn(b, n, length, generator=g, dtype=dtype)
    upstream_fast = upstream.masked_fill(~mask.unsqueeze(1), float("nan"))  # padding may carry NaN (softmax)
    fast_in = [x.clone().requires_grad_() for x in (s, t, w)]
    plain_in = [x.clone().requires_grad_() for x in (s, t, w)]
    fast = target_attention_logits(*fast_in, mask, budget=budget)
    plain = plain_attention(*plain_in, mask)
    torch.testing.assert_close(fast, plain, **TOL[dtype])
    fast.backward(upstream_fast)
    plain.backward(upstream)
    for x, y in zip(fast_in, plain_in, strict=True):
        torch.testing.assert_close(x.grad, y.grad, **TOL[dtype])


def test_target_attention_gradcheck_and_device_path():
    g = torch.Generator().manual_seed(3)
    s, t, w = (torch.randn(*size, generator=g, dtype=torch.float64, requires_grad=True)
               for size in [(3, 6, 4), (3, 5, 4), (4,)])
    mask = _masks(3, 6, seed=1)["random"]
    assert torch.autograd.gradcheck(lambda *x: target_attention_logits(*x, mask, budget=40), (s, t, w))
    torch.testing.assert_close(_broadcast_logits(s, t, w, mask), plain_attention(s, t, w, mask))
    with pytest.raises(ValueError, match="s \\[B, L, H\\] and t \\[B, n, H\\]"):
        target_attention_logits(s, t[:2], w, mask)


def test_blocks_cover_every_valid_position_within_budget():
    mask = _masks(40, 13, seed=2)["front"] | _masks(40, 13, seed=5)["random"]
    first, end = _row_spans(mask)
    blocks = _blocks(first, end, row_elements=7, budget=200)
    covered = torch.zeros_like(mask)
    for i, j, lo, hi in blocks:
        assert (j - i) * (hi - lo) * 7 <= 200 or j - i == 1
        covered[i:j, lo:hi] = True
    assert covered[mask].all() and [b[0] for b in blocks] == sorted(b[0] for b in blocks)
    assert _blocks([13, 13], [0, 0], 7, 200) == []  # rows without behaviour need no block


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_field_embedding_matches_nn_embedding(dtype):
    field = FieldEmbedding([5, 3, 9], dim=4).to(dtype)
    ids = torch.randint(0, 3, (6, 7, 3))  # repeated ids: the gradient sums their rows
    fast = field(ids)
    plain = plain_lookup(field, ids)
    torch.testing.assert_close(fast, plain, rtol=0, atol=0)
    upstream = torch.randn_like(plain)
    (fast_grad,) = torch.autograd.grad(fast, field.table.weight, upstream)
    (plain_grad,) = torch.autograd.grad(plain, field.table.weight, upstream)
    torch.testing.assert_close(fast_grad, plain_grad, **TOL[dtype])


def _din_batches():
    full = random_batch(b=5, groups=4, seed=1)
    full.seq_mask[1] = False  # a request without behaviour
    full.seq[1] = 0
    one = random_batch(b=1, groups=1, seq_len=1, seed=2)
    one.seq_mask[:] = True
    single = random_batch(b=3, groups=1, seed=3)
    single = CascadeBatch(user=single.user, seq=single.seq, seq_mask=single.seq_mask, items=single.items[:, :1],
                          mask=single.mask[:, :1], label=single.label[:, :1])  # n = 1
    return {"padded": full, "B1_L1": one, "n1": single}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("which", ["padded", "B1_L1", "n1"])
def test_din_matches_plain_reference(dtype, which):
    torch.manual_seed(0)
    plain = PlainDIN(VOCAB, emb_dim=4, hidden=16).to(dtype)
    fast = build_model("din", VOCAB, emb_dim=4, hidden=16).to(dtype)
    fast.load_state_dict(plain.state_dict(), strict=True)  # same keys: old checkpoints load
    assert list(fast.state_dict()) == list(plain.state_dict())
    batch = _din_batches()[which]
    out_fast, out_plain = fast(batch), plain(batch)
    torch.testing.assert_close(out_fast, out_plain, **TOL[dtype])
    upstream = torch.randn_like(out_plain)
    (out_fast * upstream).sum().backward()
    (out_plain * upstream).sum().backward()
    plain_params = dict(plain.named_parameters())
    for name, p in fast.named_parameters():
        torch.testing.assert_close(p.grad, plain_params[name].grad, **TOL[dtype], msg=name)


class PlainMLP(nn.Module):
    """The pre-ranking MLP with the request features expanded to every candidate before the first layer."""

    def __init__(self, vocab, emb_dim=8, hidden=128):
        super().__init__()
        self.emb = CascadeEmbeddings(vocab, emb_dim)
        self.net = mlp([(N_USER + N_SEQ + N_ITEM) * emb_dim, hidden, 64, 32, 1])

    def forward(self, batch):
        seq = masked_mean(plain_lookup(self.emb.item, batch.seq), batch.seq_mask)
        user = torch.cat([plain_lookup(self.emb.user, batch.user), seq], dim=-1)
        items = plain_lookup(self.emb.item, batch.items)
        return self.net(torch.cat([user.unsqueeze(1).expand(-1, items.shape[1], -1), items], -1)).squeeze(-1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mlp_matches_plain_reference(dtype):
    torch.manual_seed(0)
    plain = PlainMLP(VOCAB, emb_dim=4, hidden=16).to(dtype)
    fast = build_model("mlp", VOCAB, emb_dim=4, hidden=16).to(dtype)
    fast.load_state_dict(plain.state_dict(), strict=True)
    batch = random_batch(b=4, groups=3, seed=5)
    out_fast, out_plain = fast(batch), plain(batch)
    torch.testing.assert_close(out_fast, out_plain, **TOL[dtype])
    out_fast.sum().backward()
    out_plain.sum().backward()
    plain_params = dict(plain.named_parameters())
    for name, p in fast.named_parameters():
        torch.testing.assert_close(p.grad, plain_params[name].grad, **TOL[dtype], msg=name)


def _cascade_pair():
    torch.manual_seed(0)
    eager = Cascade(["dssm", "din"], [30, 20], VOCAB, "dftopk", {}, emb_dim=4, hidden=16)
    other = Cascade(["dssm", "din"], [30, 20], VOCAB, "dftopk", {}, emb_dim=4, hidden=16)
    other.load_state_dict(eager.state_dict())
    return eager, other


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    _, out = model(batch)
    out.loss.backward()
    return out.loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.grad is not None}


def test_compiled_stages_compute_the_eager_function_under_the_same_keys():
    eager, compiled = _cascade_pair()
    compile_stages(compiled, backend="eager")  # dynamo tracing, no C++ code generation
    assert list(compiled.state_dict()) == list(eager.state_dict())
    batch = random_batch(b=3, groups=4, seed=4)
    loss_e, grads_e = _loss_and_grads(eager, batch)
    loss_c, grads_c = _loss_and_grads(compiled, batch)
    torch.testing.assert_close(loss_c, loss_e)
    assert grads_c.keys() == grads_e.keys()
    for name, grad in grads_e.items():
        torch.testing.assert_close(grads_c[name], grad, msg=name)


def test_failed_compilation_falls_back_to_eager_with_one_warning(caplog):
    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("no C++ compiler\nsecond line")

    eager, compiled = _cascade_pair()
    compile_stages(compiled, backend=broken_backend)
    batch = random_batch(b=3, groups=4, seed=4)
    with caplog.at_level(logging.WARNING, logger="cascadelab.cascade.models.compiled"):
        for _ in range(2):
            loss_c, _ = _loss_and_grads(compiled, batch)
    warnings = [r for r in caplog.records if r.name == "cascadelab.cascade.models.compiled"]
    assert len(warnings) == 1 and "no C++ compiler" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()
    torch.testing.assert_close(loss_c, _loss_and_grads(eager, batch)[0])
