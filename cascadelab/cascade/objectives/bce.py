"""BCE baseline: every stage learns "is this candidate ground truth?" on its own (reference notes §1.1)."""

from __future__ import annotations

from torch import Tensor, nn

from cascadelab.cascade.batch import CascadeBatch
from cascadelab.cascade.metrics import stage_names
from cascadelab.cascade.objectives.base import ObjectiveOutput, bce_with_logits


class BCEObjective(nn.Module):
    """Sum over stages of a masked-mean BCE-with-logits against ground truth membership.

    As in the reference, the last (ranking) stage sees only the first ``last_stage_groups`` candidate
    groups (rank_pos vs rank_neg), the other stages every candidate. Deviation: the mean is over valid
    candidates, not over all slots with zero weights.
    """

    def __init__(self, num_stages: int, gt_k: int = 10, last_stage_groups: int = 2, **_: object):
        super().__init__()
        self.names = stage_names(num_stages)
        self.last_stage_groups = last_stage_groups

    def forward(self, scores: list[Tensor], batch: CascadeBatch) -> ObjectiveOutput:
        y = batch.ground_truth()
        components = {}
        total = 0.0
        last_scope = batch.mask & (batch.group_index() < self.last_stage_groups)
        for i, (name, s) in enumerate(zip(self.names, scores, strict=True)):
            scope = last_scope if i == len(scores) - 1 else batch.mask
            loss = bce_with_logits(s, y, scope)
            components[f"bce_{name}"] = loss.detach()
            total = total + loss
        return ObjectiveOutput(total, components)
