"""LapSum soft top-k cascade objective (Struski et al. 2025; zhangzhen97/DFTOPK ``topk_loss.py``, ``lapsumjoint``)."""

from __future__ import annotations

from torch import Tensor

from cascadelab.cascade.objectives.base import fill_invalid
from cascadelab.cascade.objectives.soft_topk import SoftTopKMaskObjective
from cascadelab.operators import lapsum_topk, operator_default


class LapSumObjective(SoftTopKMaskObjective):
    """:class:`SoftTopKMaskObjective` with ``p_s = lapsum_topk(s_s, gt_k, lapsum_alpha)``.

    LapSum: ``p_i = F(s_i / alpha - t)`` with F the Laplace CDF and t such that ``sum_i p_i = k``;
    ``lapsum_alpha`` defaults to the operator's ``alpha`` (the reference's value on raw logits). Invalid
    candidates are placed far below the valid ones before the operator (it takes no mask), so they get ~0
    of the k units of mass unless a request has fewer than k valid candidates; they never enter a loss.
    """

    prefix = "lapsum"

    def __init__(self, num_stages: int, gt_k: int = 10,
                 lapsum_alpha: float = operator_default("lapsum", "alpha")):
        super().__init__(num_stages, gt_k)
        if lapsum_alpha <= 0:
            raise ValueError(f"lapsum_alpha: expected > 0, got {lapsum_alpha}")
        self.alpha = lapsum_alpha

    def stage_mask(self, s: Tensor, mask: Tensor) -> Tensor:
        return lapsum_topk(fill_invalid(s, mask), self.k, self.alpha)
