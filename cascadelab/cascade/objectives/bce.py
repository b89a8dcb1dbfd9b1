"""BCE baseline: every stage learns "is this candidate ground truth?" on its own (kwai/LCRON ``bce.py``)."""

from __future__ import annotations

import math

from torch import Tensor, nn

from cascadelab.cascade.batch import CascadeBatch
from cascadelab.cascade.metrics import stage_names
from cascadelab.cascade.objectives.base import ObjectiveOutput, bce_with_logits


class BCEObjective(nn.Module):
    """Sum over stages of a masked-mean BCE-with-logits against ground-truth membership.

    ``L = sum_s mean_{i in scope_s, valid} BCE(s_i, y_i)`` with y = valid group-0 candidate; ``scores``:
    S tensors ``[B, n]``, retrieval first. Scopes, as in the reference (two- and three-stage):

    * the last stage: the first ``bce_last_stage_groups`` candidate groups (rank_pos/rank_neg, or
      rerank_pos/rerank_neg);
    * a middle stage ``s`` (1 <= s < S-1): every group except the last ``s`` (three-stage prerank: all
      but prerank_neg);
    * retrieval (stage 0): every group.

    Groups are ``slot // slots_per_group``; slots appended by in-batch negative sampling form extra
    trailing groups. Deviations: the mean is over valid candidates in scope, not over all slots with
    zero weights; one summed loss instead of one backward per stage (same gradients,
    the stages share no parameters).
    """

    def __init__(self, num_stages: int, bce_last_stage_groups: int = 2):
        super().__init__()
        if bce_last_stage_groups < 1:
            raise ValueError(f"bce_last_stage_groups: expected >= 1, got {bce_last_stage_groups}")
        self.names = stage_names(num_stages)
        self.last_stage_groups = bce_last_stage_groups

    def forward(self, scores: list[Tensor], batch: CascadeBatch) -> ObjectiveOutput:
        y = batch.ground_truth()
        group = batch.group_index()
        num_groups = math.ceil(batch.n / batch.slots_per_group)
        last = len(scores) - 1
        components = {}
        total = 0.0
        for i, (name, s) in enumerate(zip(self.names, scores, strict=True)):
            if i == last and i > 0:
                keep = self.last_stage_groups
            else:
                keep = max(num_groups - i, self.last_stage_groups)
            loss = bce_with_logits(s, y, batch.mask & (group < keep))
            components[f"bce_{name}"] = loss.detach()
            total = total + loss
        return ObjectiveOutput(total, components)
