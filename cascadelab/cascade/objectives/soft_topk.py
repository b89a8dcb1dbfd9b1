"""Shared recipe of the soft top-k mask objectives (zhangzhen97/DFTOPK ``topk_loss.py``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cascadelab.cascade.batch import CascadeBatch
from cascadelab.cascade.metrics import stage_names
from cascadelab.cascade.objectives.base import ObjectiveOutput, UncertaintyWeights, bce_prob


class SoftTopKMaskObjective(nn.Module):
    """Per-stage BCE on a soft top-``gt_k`` mask ``p_s = op(s_s)`` in [0, 1], plus a joint BCE on ``prod_s p_s``.

    ``L = sum_s L_s / (2 w_s^2) + ln(prod_s w_s) + L_joint`` (joint weight fixed at 1, as in the reference),
    ``L_s = mean_{valid} -[y ln(p_s + eps) + (1 - y) ln(1 - p_s + eps)]``, eps = 1e-6. Subclasses define
    :meth:`stage_mask` (``[B, n]`` scores and validity mask -> ``[B, n]`` probabilities, padded
    candidates ~0). Deviations from the reference: y is the real ground truth (the reference takes the
    hard top-10 of the unmasked labels, so padded ground-truth slots were positives), padded candidates
    are kept out of the selection and of every mean, log-variance uncertainty weights.
    """

    prefix = "topk"

    def __init__(self, num_stages: int, gt_k: int = 10):
        super().__init__()
        self.names = stage_names(num_stages)
        self.k = gt_k
        self.weights = UncertaintyWeights(num_stages)

    def stage_mask(self, s: Tensor, mask: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, scores: list[Tensor], batch: CascadeBatch) -> ObjectiveOutput:
        y = batch.ground_truth()
        mask = batch.mask
        stage_losses, components = [], {}
        joint = torch.ones_like(scores[0])
        for name, s in zip(self.names, scores, strict=True):
            p = self.stage_mask(s, mask)
            loss = bce_prob(p, y, mask)
            stage_losses.append(loss)
            components[f"{self.prefix}_{name}"] = loss.detach()
            joint = joint * p
        joint_loss = bce_prob(joint, y, mask)
        components[f"{self.prefix}_joint"] = joint_loss.detach()
        for name, lv in zip(self.names, self.weights.log_var.detach(), strict=True):
            components[f"{self.prefix}_weight_{name}"] = torch.exp(0.5 * lv)
        return ObjectiveOutput(self.weights(stage_losses) + joint_loss, components)
