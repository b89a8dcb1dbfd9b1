"""DSSM two-tower retrieval model (LCRON's models, kwai/LCRON), with masked mean pooling of the sequence."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cascadelab.cascade.batch import CascadeBatch
from cascadelab.cascade.models.embedding import N_ITEM, N_SEQ, N_USER, CascadeEmbeddings, masked_mean, mlp


class DSSM(nn.Module):
    """score = <user_tower(user fields, mean(seq)), item_tower(item fields)>; returns ``[B, n]`` logits.

    Deviation: the reference sums all 50 sequence rows (padding included) before dividing by the valid
    count; here padded rows are masked out.
    """

    def __init__(self, vocab: dict[str, int], emb_dim: int = 8, hidden: int = 128):
        super().__init__()
        self.emb = CascadeEmbeddings(vocab, emb_dim)
        self.user_tower = mlp([(N_USER + N_SEQ) * emb_dim, hidden, 64, 32])
        self.item_tower = mlp([N_ITEM * emb_dim, hidden, 64, 32])

    def user_input(self, batch: CascadeBatch) -> Tensor:
        seq = masked_mean(self.emb.seq_features(batch.seq), batch.seq_mask)
        return torch.cat([self.emb.user_features(batch.user), seq], dim=-1)

    def forward(self, batch: CascadeBatch) -> Tensor:
        u = self.user_tower(self.user_input(batch))  # [B, 32]
        v = self.item_tower(self.emb.item_features(batch.items))  # [B, n, 32]
        return (v * u.unsqueeze(1)).sum(-1)

