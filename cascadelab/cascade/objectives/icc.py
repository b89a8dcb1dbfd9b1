"""ICC: a fused-score joint ranker over the whole cascade (Gallagher et al. 2019; kwai/LCRON ``icc.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cascadelab.cascade.batch import CascadeBatch
from cascadelab.cascade.objectives.base import ObjectiveOutput, default_ks, masked_mean
from cascadelab.operators import dftopk


def icc_fused_score(scores: list[Tensor], ks: list[int], mask: Tensor, temperature: float,
                    stage_scale: float) -> Tensor:
    """``[B, n]`` fused score of an S-stage cascade.

    Gate of stage j: ``I_j = sigmoid((s_j - kappa_j) / temperature)`` with ``kappa_j`` the midpoint of the
    ``ks[j]``-th and ``(ks[j]+1)``-th largest valid scores of ``s_j`` (gradient flows into those two): the
    DFTopK mask ``dftopk(s_j, ks[j], temperature, mask)``, 0 on invalid candidates. Then

        e = sum_{j < S-1} c_j * (prod_{i<j} I_i) * (1 - I_j) * s_j + c_{S-1} * (prod_{i<S} I_i) * s_{S-1}

    with ``c_j = stage_scale ** j``. Two stages, scale 1: ``(1 - I_r) s_r + I_r I_p s_p``; three stages,
    scale 2: ``(1 - I_r) s_r + 2 I_r (1 - I_p) s_p + 4 I_r I_p I_k s_k`` -- the reference's two recipes.
    """
    gates = [dftopk(s, k, temperature, mask=mask) for s, k in zip(scores, ks, strict=True)]
    fused = torch.zeros_like(scores[0])
    passed = torch.ones_like(scores[0])
    last = len(scores) - 1
    for j, (s, gate) in enumerate(zip(scores, gates, strict=True)):
        scale = stage_scale ** j
        if j < last:
            fused = fused + scale * passed * (1 - gate) * s
            passed = passed * gate
        else:
            fused = fused + scale * passed * gate * s
    return fused


def pairwise_logistic(e: Tensor, label: Tensor, mask: Tensor) -> Tensor:
    """Mean over valid untied pairs ``(i, j)`` with ``label_i > label_j`` of ``softplus(-(e_i - e_j))``."""
    pairs = (label.unsqueeze(-1) > label.unsqueeze(-2)) & mask.unsqueeze(-1) & mask.unsqueeze(-2)
    loss = F.softplus(e.unsqueeze(-2) - e.unsqueeze(-1))  # [b, i, j] = softplus(-(e_i - e_j))
    return masked_mean(loss, pairs)


class ICCObjective(nn.Module):
    """RankNet loss on the ICC fused score (:func:`icc_fused_score`) against the graded labels.

    ``L = mean over valid pairs (i, j) with l_i > l_j of softplus(-(e_i - e_j))``; ``scores``: S tensors
    ``[B, n]``; ``ks``: the cascade's stage cut-offs. One backward through every stage.

    Deviations from the reference code (kwai/LCRON ``two_stage/icc.py``, ``three_stage/icc.py``):

    * stage ``j``'s cut is ``ks[j]`` (two-stage 30/20, three-stage 40/30/20); the reference cuts the
      pre-rank stage at 30 (two-stage) and the rank stage at 30 (three-stage);
    * the cut value is the midpoint of the K-th and (K+1)-th valid scores, so near-hard gates keep exactly
      K; the reference's cut value is the K-th score itself, whose item then gets a gate of 1/2; a request
      with at most K valid candidates passes them all (DFTopK's saturation convention);
    * padded candidates are excluded from the cuts and from every pair (the reference uses unmasked
      labels, so padded ground-truth slots were top-graded positives);
    * tied pairs are dropped (the reference trains them to follow slot order);
    * the mean is over the informative pairs, not over all n^2 cells;
    * ``icc_temperature`` defaults to 0.5, from the paper's grid {0.05, 0.1, 0.5, 1}; the reference code
      hard-codes 1e-3. With near-hard gates the fused score collapses: a candidate rejected by the last
      stage scores ~0, so once the last stage's scores are negative the pairwise loss is minimised by
      pushing the ground truth OUT of the last stage; soft gates avoid that. ``icc_stage_scale`` (None =
      the reference: 1 for two stages, 2 for three or more) is configurable.
    """

    def __init__(self, num_stages: int, ks: list[int] | None = None, icc_temperature: float = 0.5,
                 icc_stage_scale: float | None = None):
        super().__init__()
        if icc_temperature <= 0:
            raise ValueError(f"icc_temperature: expected > 0, got {icc_temperature}")
        self.ks = default_ks(num_stages, ks)
        self.temperature = icc_temperature
        self.stage_scale = icc_stage_scale if icc_stage_scale is not None else (1.0 if num_stages <= 2 else 2.0)

    def forward(self, scores: list[Tensor], batch: CascadeBatch) -> ObjectiveOutput:
        e = icc_fused_score(scores, self.ks, batch.mask, self.temperature, self.stage_scale)
        loss = pairwise_logistic(e, batch.label, batch.mask)
        return ObjectiveOutput(loss, {"icc_pairwise": loss.detach()})
