"""RankFlow: stage-wise BCE on the upstream selection plus downstream-to-upstream distillation.

Reference code: kwai/LCRON ``two_stage/rankflow.py`` and ``three_stage/rankflow.py``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from cascadelab.cascade.batch import CascadeBatch
from cascadelab.cascade.metrics import stage_names
from cascadelab.cascade.objectives.base import ObjectiveOutput, bce_with_logits, default_ks, masked_mean, row_mean
from cascadelab.operators import hard_topk_mask


class RankFlowObjective(nn.Module):
    """Joint RankFlow loss for an S-stage cascade (``scores``: S tensors ``[B, n]``, retrieval first).

    Hard selections (no gradient): ``T_0`` = top ``ks[0]`` valid candidates by ``s_0``, ``T_j`` = top
    ``ks[j]`` of ``T_{j-1}`` by ``s_j``. With y = ground truth:

    * ``bce_0 = BCE(s_0, y)`` over valid candidates; for j >= 1 ``bce_j = BCE(s_j, y)`` over ``T_{j-1}``
      (stage j only sees what stage j-1 passed on);
    * ``mse_{j-1} = mean_{T_{j-1}} (sg(s_j) - s_{j-1})^2`` (distil stage j into stage j-1);
    * ``rank_{j-1} = -mean_b ln sigmoid(mean_{T_j} s_{j-1} - mean_{T_{j-1} minus T_j} s_{j-1})`` (stage j-1
      should rank stage j's choice first; rows where either set is empty are skipped);
    * ``L = sum_j bce_j + w_mse * sum mse + w_rank * sum rank`` with ``(w_mse, w_rank) = (1 - a, a)`` for
      ``rankflow_alpha = a``. ``rankflow_alpha = None`` (default) is the reference: a = 0 for two
      stages (the rank term is computed and logged but off), weight 1 on every term for three or more.

    Deviations from the reference code: y and every selection use the real validity mask (the reference
    labels padded group-0 slots positive and can select padding); selections are
    :func:`~cascadelab.operators.hard_topk_mask` (ties to the lower slot); the two-stage rank term splits
    ``T_0`` at the next stage's cut-off ``ks[1]`` (top-20 vs the rest), where the reference splits at 10
    (inactive there anyway, a = 0) -- the three-stage reference already splits at the next stage's cut-off.
    """

    def __init__(self, num_stages: int, ks: list[int] | None = None, rankflow_alpha: float | None = None):
        super().__init__()
        if rankflow_alpha is not None and not 0.0 <= rankflow_alpha <= 1.0:
            raise ValueError(f"rankflow_alpha: expected a value in [0, 1] or None, got {rankflow_alpha}")
        self.names = stage_names(num_stages)
        self.ks = default_ks(num_stages, ks)
        if rankflow_alpha is None:
            self.w_mse, self.w_rank = (1.0, 0.0) if num_stages <= 2 else (1.0, 1.0)
        else:
            self.w_mse, self.w_rank = 1.0 - rankflow_alpha, rankflow_alpha

    def forward(self, scores: list[Tensor], batch: CascadeBatch) -> ObjectiveOutput:
        y = batch.ground_truth()
        components = {}
        loss = bce_with_logits(scores[0], y, batch.mask)
        components[f"rankflow_bce_{self.names[0]}"] = loss.detach()
        kept = hard_topk_mask(scores[0], self.ks[0], mask=batch.mask)
        for j in range(1, len(scores)):
            up, down = scores[j - 1], scores[j]
            bce = bce_with_logits(down, y, kept)
            mse = masked_mean((down.detach() - up) ** 2, kept)
            chosen = hard_topk_mask(down, self.ks[j], mask=kept)
            rest = kept & ~chosen
            rows = chosen.any(-1) & rest.any(-1)
            margin = row_mean(up, chosen) - row_mean(up, rest)
            rank = masked_mean(-F.logsigmoid(margin), rows)
            loss = loss + bce + self.w_mse * mse + self.w_rank * rank
            components[f"rankflow_bce_{self.names[j]}"] = bce.detach()
            components[f"rankflow_mse_{self.names[j - 1]}"] = mse.detach()
            components[f"rankflow_rank_{self.names[j - 1]}"] = rank.detach()
            kept = chosen
        return ObjectiveOutput(loss, components)
