"""MLP pre-ranking model for three-stage cascades (LCRON's models, kwai/LCRON)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cascadelab.cascade.batch import CascadeBatch
from cascadelab.cascade.models.embedding import (
    N_ITEM,
    N_SEQ,
    N_USER,
    CascadeEmbeddings,
    masked_mean,
    mlp,
    request_linear,
)


class MLP(nn.Module):
    """[user fields ; mean(seq) ; item fields] -> [hidden, 64, 32, 1]; returns ``[B, n]`` logits."""

    def __init__(self, vocab: dict[str, int], emb_dim: int = 8, hidden: int = 128):
        super().__init__()
        self.emb = CascadeEmbeddings(vocab, emb_dim)
        self.net = mlp([(N_USER + N_SEQ + N_ITEM) * emb_dim, hidden, 64, 32, 1])

    def forward(self, batch: CascadeBatch) -> Tensor:
        seq = masked_mean(self.emb.seq_features(batch.seq), batch.seq_mask)
        user = torch.cat([self.emb.user_features(batch.user), seq], dim=-1)  # [B, 13E], once per request
        hidden = request_linear(self.net[0], user, self.emb.item_features(batch.items))  # [B, n, hidden]
        return self.net[1:](hidden).squeeze(-1)
