"""DIN ranking model (LCRON's models, kwai/LCRON): target attention over the behaviour sequence."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cascadelab.cascade.batch import CascadeBatch
from cascadelab.cascade.models.attention import target_attention_logits
from cascadelab.cascade.models.embedding import N_ITEM, N_SEQ, N_USER, CascadeEmbeddings, mlp, request_linear


class DIN(nn.Module):
    """Returns ``[B, n]`` logits.

    Attention logit a(seq_j, target) = w2 . relu(W1 [seq_j ; target] + b1) + b2, softmax over the valid
    positions, interest = attention-weighted sum of the sequence embeddings. Scorer input: user fields,
    interest, the target's 5 id fields and its 3 upload-time fields -> [hidden, hidden, 32, 1].
    W1 [seq ; target] is computed as W1_seq seq + W1_tgt target (per position and per candidate), and the
    logits over the ``[B, n, L, 2d]`` pre-activation by ``attention.target_attention_logits`` (in
    cache-sized blocks on the CPU). The scorer's first layer takes the user fields once per request
    (``embedding.request_linear``). Parameter names are those of the plain layers above.
    Deviation: padded positions are masked with -inf-like logits as in the reference, but a request with
    no behaviour at all gets a zero interest vector instead of a uniform average over padding.
    """

    def __init__(self, vocab: dict[str, int], emb_dim: int = 8, hidden: int = 128):
        super().__init__()
        self.emb = CascadeEmbeddings(vocab, emb_dim)
        d = N_SEQ * emb_dim
        self.att_seq = nn.Linear(d, 2 * d)
        self.att_tgt = nn.Linear(d, 2 * d, bias=False)
        self.att_out = nn.Linear(2 * d, 1)
        self.scorer = mlp([N_USER * emb_dim + d + N_ITEM * emb_dim, hidden, hidden, 32, 1])

    def forward(self, batch: CascadeBatch) -> Tensor:
        seq = self.emb.seq_features(batch.seq)  # [B, L, d]
        items = self.emb.item_features(batch.items)  # [B, n, 8E]
        d = seq.shape[-1]
        target = items[..., :d]  # the 5 id fields, [B, n, d]
        logits = target_attention_logits(self.att_seq(seq), self.att_tgt(target),  # [B, L, 2d], [B, n, 2d]
                                         self.att_out.weight.view(-1), batch.seq_mask) + self.att_out.bias
        logits = logits.masked_fill(~batch.seq_mask.unsqueeze(1), float("-inf"))
        weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # rows without behaviour -> 0
        interest = torch.einsum("bnl,bld->bnd", weights, seq)  # [B, n, d]
        user = self.emb.user_features(batch.user)  # [B, 8E], shared by the request's candidates
        hidden = request_linear(self.scorer[0], user, torch.cat([interest, items], dim=-1))
        return self.scorer[1:](hidden).squeeze(-1)
