"""FS-RankNet: every stage learns the full stage order of the candidate groups (kwai/LCRON ``fs_ranknet.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cascadelab.cascade.batch import CascadeBatch
from cascadelab.cascade.metrics import stage_names
from cascadelab.cascade.objectives.base import ObjectiveOutput


def group_order_ranknet(s: Tensor, group: Tensor, mask: Tensor) -> Tensor:
    """``sum_a mean_{valid pairs i in G_a, j in G_{>a}} softplus(-(s_i - s_j))`` (levels without pairs skipped).

    ``s, mask: [B, n]``; ``group: [n]`` int64 (lower = further down the cascade = better).
    """
    higher = group.unsqueeze(-1) < group.unsqueeze(-2)  # [n, n]: i's group is above j's
    pairs = higher & mask.unsqueeze(-1) & mask.unsqueeze(-2)  # [B, n, n]
    loss = F.softplus(s.unsqueeze(-2) - s.unsqueeze(-1))  # [b, i, j] = softplus(-(s_i - s_j))
    per_item = torch.where(pairs, loss, torch.zeros_like(loss)).sum((0, -1))  # [n], by higher item i
    counts = pairs.sum((0, -1)).to(s.dtype)
    levels = int(group.max()) + 1
    num = s.new_zeros(levels).index_add_(0, group, per_item)
    den = s.new_zeros(levels).index_add_(0, group, counts)
    return torch.where(den > 0, num / den.clamp_min(1.0), torch.zeros_like(num)).sum()


class FSRankNetObjective(nn.Module):
    """Full-stage RankNet (Zheng et al. 2024), applied to each stage's scores on every candidate.

    Groups ``G_0 > G_1 > ...`` follow the slot layout (ground truth, then the negatives of ever earlier
    stages; slots appended by in-batch negative sampling form the lowest groups). For each stage:
    ``L_s = sum_a [sum_b sum_{i in G_a} sum_{j in G_{>a}} m_i m_j softplus(-(s_i - s_j))] /
    [sum_b sum_{i in G_a} sum_{j in G_{>a}} m_i m_j]``; ``L = sum_s L_s`` (stages share no parameters, so
    one summed backward equals the reference's per-model backward). ``scores``: S tensors ``[B, n]``.

    Deviations from kwai/LCRON ``fs_ranknet.py``: both items of a pair must be valid (the two-stage reference
    masks only the higher one, the three-stage one nothing) and each level is normalised by its valid
    pair count (the reference divides by |G_{>a}| times the higher-group count, or by 10 B).
    """

    def __init__(self, num_stages: int):
        super().__init__()
        self.names = stage_names(num_stages)

    def forward(self, scores: list[Tensor], batch: CascadeBatch) -> ObjectiveOutput:
        group = batch.group_index()
        components = {}
        total = 0.0
        for name, s in zip(self.names, scores, strict=True):
            loss = group_order_ranknet(s, group, batch.mask)
            components[f"fs_ranknet_{name}"] = loss.detach()
            total = total + loss
        return ObjectiveOutput(total, components)
