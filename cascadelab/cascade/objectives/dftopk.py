"""DFTopK cascade objective (Zhu et al. 2025; zhangzhen97/DFTOPK ``topk_loss.py``, ``dftopkjoint``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cascadelab.cascade.batch import CascadeBatch
from cascadelab.cascade.metrics import stage_names
from cascadelab.cascade.objectives.base import (
    ObjectiveOutput,
    UncertaintyWeights,
    bce_from_log_prob,
    bce_with_logits,
)
from cascadelab.operators import dftopk_logits, operator_default


class DFTopKObjective(nn.Module):
    """Per-stage BCE on DFTopK logits with k = gt_k, plus a joint BCE on the product of the soft masks.

    z_s = (s - theta_s) / tau with theta_s the midpoint of the k-th and (k+1)-th largest valid score;
    L_s = BCE(z_s, y); L_joint = BCE(prod_s sigmoid(z_s), y); total = UWL(L_1..L_S) + L_joint (the joint
    weight is fixed at 1, as in the reference). Deviations: y is the real ground truth (padded group-0
    slots are not positives) and padded candidates are excluded from theta and from every mean;
    log-variance uncertainty weights. ``scores``: S tensors ``[B, n]`` (any number of stages).
    """

    def __init__(self, num_stages: int, gt_k: int = 10, tau: float = operator_default("dftopk", "tau")):
        super().__init__()
        self.names = stage_names(num_stages)
        self.k = gt_k
        self.tau = tau
        self.weights = UncertaintyWeights(num_stages)

    def forward(self, scores: list[Tensor], batch: CascadeBatch) -> ObjectiveOutput:
        y = batch.ground_truth()
        mask = batch.mask
        stage_losses = []
        log_joint = torch.zeros_like(scores[0])
        components = {}
        for name, s in zip(self.names, scores, strict=True):
            z = dftopk_logits(s, self.k, self.tau, mask=mask)
            loss = bce_with_logits(z, y, mask)
            stage_losses.append(loss)
            components[f"dftopk_{name}"] = loss.detach()
            log_joint = log_joint + F.logsigmoid(z)
        joint = bce_from_log_prob(log_joint, y, mask)
        components["dftopk_joint"] = joint.detach()
        for name, lv in zip(self.names, self.weights.log_var.detach(), strict=True):
            components[f"dftopk_weight_{name}"] = torch.exp(0.5 * lv)
        total = self.weights(stage_losses) + joint
        return ObjectiveOutput(total, components)
