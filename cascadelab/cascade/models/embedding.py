"""Per-model embedding tables for the user, sequence and candidate item fields.

All fields of one kind live in one fused ``nn.Embedding`` with per-field row offsets, so a lookup of
``[..., F]`` ids is a single gather. Table sizes come from the dataset's vocabulary metadata: a field
with ``V`` real ids (stored 1..V, 0 = padding) gets ``V + 1`` rows. Deviation from the reference: no
``padding_idx`` (padded positions are masked by every consumer instead), and category_level_one is
shifted like every other id (the reference's padding_idx 2 would freeze a real category).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cascadelab.cascade.batch import ITEM_FIELDS, SEQ_FIELDS, TIME_VOCAB, USER_FIELDS


class FieldEmbedding(nn.Module):
    """``ids: [..., F]`` int64 -> ``[..., F * dim]``: one embedding per field, concatenated."""

    def __init__(self, sizes: list[int], dim: int):
        super().__init__()
        offsets = torch.tensor([0] + sizes[:-1]).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)
        self.table = nn.Embedding(int(sum(sizes)), dim)
        self.num_fields = len(sizes)

    def forward(self, ids: Tensor) -> Tensor:
        # The table's rows picked by index_select: the same lookup as ``self.table(...)``, whose backward
        # (one index_add) is cheaper on the CPU than the embedding backward's sort-and-reduce.
        rows = (ids + self.offsets[: ids.shape[-1]]).reshape(-1)
        return self.table.weight.index_select(0, rows).view(*ids.shape[:-1], -1)


def _size(vocab: dict[str, int], name: str) -> int:
    if name in TIME_VOCAB:
        return TIME_VOCAB[name] + 1
    if name not in vocab:
        raise ValueError(f"vocab: missing size for field '{name}' (dataset metadata 'vocab')")
    return int(vocab[name]) + 1


class CascadeEmbeddings(nn.Module):
    """The user-side and item-side tables of one stage model; sequence fields share the item tables."""

    def __init__(self, vocab: dict[str, int], dim: int):
        super().__init__()
        self.dim = dim
        self.user = FieldEmbedding([_size(vocab, f) for f in USER_FIELDS], dim)
        # Item fields in ITEM_FIELDS order; SEQ_FIELDS are its first five, so the sequence reuses them.
        self.item = FieldEmbedding([_size(vocab, f) for f in ITEM_FIELDS], dim)

    def user_features(self, user: Tensor) -> Tensor:
        """``[B, 8]`` -> ``[B, 8 * dim]``."""
        return self.user(user)

    def item_features(self, items: Tensor) -> Tensor:
        """``[B, n, 8]`` -> ``[B, n, 8 * dim]``."""
        return self.item(items)

    def seq_features(self, seq: Tensor) -> Tensor:
        """``[B, L, 5]`` -> ``[B, L, 5 * dim]``."""
        return self.item(seq)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """``x: [B, L, D]``, ``mask: [B, L]`` bool -> ``[B, D]`` mean over valid positions (0 if none)."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


def request_linear(layer: nn.Linear, request: Tensor, candidates: Tensor) -> Tensor:
    """``layer([request ; candidates])`` with the request's part broadcast over its candidates.

    ``request: [B, Dr]``, ``candidates: [B, n, Dc]``, ``layer: Linear(Dr + Dc, out)`` -> ``[B, n, out]``.
    The weight splits by columns, ``W [r ; c] + b = (W_r r + b) + W_c c``, so the request's product is
    computed once per request instead of once per candidate.
    """
    dr = request.shape[-1]
    per_request = F.linear(request, layer.weight[:, :dr], layer.bias)  # [B, out]
    return F.linear(candidates, layer.weight[:, dr:]) + per_request.unsqueeze(1)


def mlp(sizes: list[int], last_activation: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2 or last_activation:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


N_SEQ = len(SEQ_FIELDS)
N_ITEM = len(ITEM_FIELDS)
N_USER = len(USER_FIELDS)
