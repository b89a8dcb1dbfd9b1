"""Sparse soft top-k cascade objective (Sander et al. 2023; zhangzhen97/DFTOPK ``topk_loss.py``, ``googlejoint``)."""

from __future__ import annotations

from torch import Tensor

from cascadelab.cascade.objectives.base import fill_invalid
from cascadelab.cascade.objectives.soft_topk import SoftTopKMaskObjective
from cascadelab.operators import operator_default, sparse_topk


class SparseTopKObjective(SoftTopKMaskObjective):
    """:class:`SoftTopKMaskObjective` with ``p_s = sparse_topk(s_s, gt_k)`` at ``sparse_topk_l``.

    The sparse soft top-k mask is the projection of ``s / l`` onto the capped simplex (values in [0, 1],
    exact 0s and 1s away from the cut); ``sparse_topk_l`` defaults to the operator's ``l`` (the DFTopK
    repo's value). Deviation: the reference feeds this [0, 1] mask to BCE-with-logits as if it were a
    logit (and uses sigmoid of it for the joint term); here it is used as the probability it is, like
    LapSum (eps = 1e-6 in the logs). Invalid candidates are placed far below the valid ones before the
    operator (it takes no mask).
    """

    prefix = "sparse_topk"

    def __init__(self, num_stages: int, gt_k: int = 10,
                 sparse_topk_l: float = operator_default("sparse-topk", "l")):
        super().__init__(num_stages, gt_k)
        if sparse_topk_l <= 0:
            raise ValueError(f"sparse_topk_l: expected > 0, got {sparse_topk_l}")
        self.strength = sparse_topk_l

    def stage_mask(self, s: Tensor, mask: Tensor) -> Tensor:
        return sparse_topk(fill_invalid(s, mask), self.k, l=self.strength)
