"""FS-LambdaLoss: a TF-Ranking-style LambdaLoss (NDCG-Loss2++) on every stage (kwai/LCRON ``fs_lambdaloss.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cascadelab.cascade.batch import CascadeBatch
from cascadelab.cascade.metrics import stage_names
from cascadelab.cascade.objectives.base import ObjectiveOutput


def _discount(x: Tensor) -> Tensor:
    """``D(x) = 1 / ln(1 + x)`` (natural log, as the reference), 0 where ``x <= 0``."""
    return torch.where(x > 0, 1.0 / torch.log1p(x.clamp_min(1.0)), torch.zeros_like(x))


def lambda_weights(s: Tensor, label: Tensor, mask: Tensor, topn: int, smoothing: float) -> Tensor:
    """``[B, n, n]`` pair weights ``w_ij`` (no gradient); non-zero only for valid pairs with ``l_i > l_j``.

    ``g_i = l_i / IDCG`` (IDCG over all valid positions, ``g = 0`` if IDCG <= 0); ``r_i`` = 1-based hard
    rank of ``s_i`` among the valid items (descending); ``u_ij = |D(|r_i - r_j|) - D(|r_i - r_j| + 1)|`` if
    ``min(r_i, r_j) <= topn``, else 0; ``v_ij = |D~(r_i) - D~(r_j)|`` with ``D~(r) = D(r) 1[r <= topn]``;
    ``delta = (1 - f) u + f v`` (``u`` alone if ``f <= 0.001``); ``w_ij = |g_i - g_j| delta_ij``.
    """
    with torch.no_grad():
        n = s.shape[-1]
        gains = torch.where(mask, label, torch.zeros_like(label)).to(s.dtype)
        positions = torch.arange(1, n + 1, device=s.device, dtype=s.dtype)
        ideal = gains.sort(dim=-1, descending=True).values
        idcg = (ideal * _discount(positions)).sum(-1, keepdim=True)
        g = torch.where(idcg > 0, gains / idcg.clamp_min(1e-12), torch.zeros_like(gains))
        order = s.masked_fill(~mask, float("-inf")).argsort(dim=-1, descending=True)
        rank = torch.empty_like(s).scatter_(-1, order, positions.expand_as(s))
        r_i, r_j = rank.unsqueeze(-1), rank.unsqueeze(-2)
        # u depends on the rank gap only: one table lookup per pair instead of two logs
        steps = torch.arange(n + 1, device=s.device, dtype=s.dtype)
        u_of_gap = (_discount(steps) - _discount(steps + 1)).abs()
        u_of_gap[0] = 0.0
        in_top = (r_i <= topn) | (r_j <= topn)
        u = u_of_gap[(r_i - r_j).abs().long()] * in_top
        if smoothing > 0.001:
            d_top = torch.where(rank <= topn, _discount(rank), torch.zeros_like(rank))
            v = (d_top.unsqueeze(-1) - d_top.unsqueeze(-2)).abs()
            delta = (1 - smoothing) * u + smoothing * v
        else:
            delta = u
        pairs = (label.unsqueeze(-1) > label.unsqueeze(-2)) & mask.unsqueeze(-1) & mask.unsqueeze(-2)
        w = (g.unsqueeze(-1) - g.unsqueeze(-2)).abs() * delta
        return torch.where(pairs, w, torch.zeros_like(w))


def lambda_loss(s: Tensor, label: Tensor, mask: Tensor, topn: int, smoothing: float) -> Tensor:
    """``mean over rows with a valid item of sum_{i, j: l_i > l_j} w_ij softplus(-(s_i - s_j))``."""
    w = lambda_weights(s, label, mask, topn, smoothing)
    pair_loss = F.softplus(s.unsqueeze(-2) - s.unsqueeze(-1))  # [b, i, j] = softplus(-(s_i - s_j))
    per_row = (w * pair_loss).sum((-2, -1))
    rows = mask.any(-1).to(s.dtype)
    return (per_row * rows).sum() / rows.sum().clamp_min(1.0)


class FSLambdaLossObjective(nn.Module):
    """LambdaLoss on every stage's scores over every valid candidate, graded labels; ``L = sum_s L_s``.

    See :func:`lambda_weights` for the weights; ``lambdaloss_topn`` (30) and ``lambdaloss_smoothing``
    f (0.8) are the values the reference runs with. ``scores``: S tensors ``[B, n]``.

    Deviations from kwai/LCRON ``fs_lambdaloss.py``: padded candidates get no gain, no rank and no pair (the
    reference uses the unmasked labels, so padded ground-truth slots are top-graded); each informative
    pair is counted once (the reference sums all ordered pairs, i.e. twice; the loss is half the
    reference's, same direction); the batch mean skips requests without a valid candidate.
    """

    def __init__(self, num_stages: int, lambdaloss_topn: int = 30, lambdaloss_smoothing: float = 0.8):
        super().__init__()
        if lambdaloss_topn < 1 or not 0.0 <= lambdaloss_smoothing <= 1.0:
            raise ValueError(f"lambdaloss_topn >= 1 and lambdaloss_smoothing in [0, 1] expected, got "
                             f"{lambdaloss_topn} and {lambdaloss_smoothing}")
        self.names = stage_names(num_stages)
        self.topn = lambdaloss_topn
        self.smoothing = lambdaloss_smoothing

    def forward(self, scores: list[Tensor], batch: CascadeBatch) -> ObjectiveOutput:
        components = {}
        total = 0.0
        for name, s in zip(self.names, scores, strict=True):
            loss = lambda_loss(s, batch.label, batch.mask, self.topn, self.smoothing)
            components[f"fs_lambdaloss_{name}"] = loss.detach()
            total = total + loss
        return ObjectiveOutput(total, components)
