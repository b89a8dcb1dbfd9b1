"""LCRON: end-to-end cascade recall through soft permutations (Wang et al. ICML 2025; kwai/LCRON ``lcron.py``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cascadelab.cascade.batch import CascadeBatch
from cascadelab.cascade.metrics import stage_names
from cascadelab.cascade.objectives.base import (
    EPS,
    ObjectiveOutput,
    UncertaintyWeights,
    default_ks,
    masked_mean,
    row_mean,
)
from cascadelab.cascade.objectives.sorting import SORTS, memberships, soft_permutation
from cascadelab.operators import operator_default


class LCRONObjective(nn.Module):
    """``L = sum_s L_single(s) / (2 w_s^2) + ln(prod_s w_s) + L_e2e`` for an S-stage cascade.

    ``scores``: S tensors ``[B, n]``. Per stage, ``P_s`` = soft permutation of ``s_s`` (``lcron_sort``:
    NeuralSort / SoftSort with temperature ``lcron_tau``, or DiffSort with ``diffsort_steepness`` on the
    ``diffsort_network``), rows = positions, invalid candidates sorted last and masked out. With quota
    ``q_s`` (``gt_k`` = 10 for every stage, the paper's choice; the cascade's ``ks`` when
    ``lcron_stage_quotas``), memberships ``pi_s, beta_s`` (:func:`memberships`), y = ground truth,
    y-bar = valid non-ground-truth, c = valid count:

    * ``L_single(s) = mean_{b: c > q_s} (1/c) sum_i [-ln(pi_s(i) + eps) y_i - ln(beta_s(i) + eps) ybar_i]``
    * ``L_e2e = mean_{b: c > min q} (1/c) sum_i [-ln(prod_s pi_s(i) + eps) y_i
      - ln(1 - prod_s (1 - beta_s(i)) + eps) ybar_i]`` -- the negative term keeps its gradient path
      through the bottom rows (not simplified to ``1 - prod pi``);
    * ``w_s = exp(lv_s / 2)`` learnable (``UncertaintyWeights``), the weight of ``L_e2e`` fixed at 1 and
      the natural log, as in the reference code (paper Eq. 13 also weights ``L_e2e`` and uses log2).

    Deviations from the reference code (kwai/LCRON ``two_stage/lcron.py``, ``three_stage/lcron.py``): y and y-bar are
    computed directly, once (no NeuralSort of the labels, hence neither the two-stage soft tie blocks nor
    the three-stage binarised ones, and padded ground-truth slots are not positives); items use the real
    validity mask and positions the valid rows (reference: the sequence mask for both); sums are
    normalised by each request's c (reference: n) and averaged over the requests that pass the gate;
    ``L_e2e`` is gated like ``L_single`` (reference: masked items add the constant ``-ln 1e-6``);
    log-variance weights; the loss is computed once per step and the components are detached values of
    that computation.
    """

    fixed_sort: str | None = None

    def __init__(self, num_stages: int, ks: list[int] | None = None, gt_k: int = 10,
                 lcron_tau: float = operator_default("neuralsort", "tau"), lcron_sort: str = "neuralsort",
                 diffsort_steepness: float = operator_default("diffsort", "steepness"),
                 diffsort_network: str = "odd_even", lcron_stage_quotas: bool = False):
        super().__init__()
        sort = self.fixed_sort or lcron_sort
        if sort not in SORTS:
            raise ValueError(f"lcron_sort: expected one of {', '.join(SORTS)}, got '{lcron_sort}'")
        if lcron_tau <= 0 or diffsort_steepness <= 0:
            raise ValueError(f"lcron_tau and diffsort_steepness: expected > 0, got {lcron_tau}, {diffsort_steepness}")
        self.names = stage_names(num_stages)
        self.quotas = default_ks(num_stages, ks) if lcron_stage_quotas else [gt_k] * num_stages
        self.sort = sort
        self.tau = lcron_tau
        self.steepness = diffsort_steepness
        self.network = diffsort_network
        self.weights = UncertaintyWeights(num_stages)

    def forward(self, scores: list[Tensor], batch: CascadeBatch) -> ObjectiveOutput:
        mask = batch.mask
        y = batch.ground_truth()
        ybar = mask & ~y
        count = mask.sum(-1)
        singles, components = [], {}
        joint_in = torch.ones_like(scores[0])
        joint_keep = torch.ones_like(scores[0])
        for name, s, q in zip(self.names, scores, self.quotas, strict=True):
            perm = soft_permutation(s, mask, self.sort, self.tau, self.steepness, self.network)
            pi, beta = memberships(perm, q, mask)
            item = -torch.log(pi + EPS) * y - torch.log(beta + EPS) * ybar
            single = masked_mean(row_mean(item, mask), count > q)
            singles.append(single)
            components[f"lcron_single_{name}"] = single.detach()
            joint_in = joint_in * pi
            joint_keep = joint_keep * (1 - beta)
        joint_out = (1 - joint_keep).clamp_min(0.0)
        item = -torch.log(joint_in + EPS) * y - torch.log(joint_out + EPS) * ybar
        e2e = masked_mean(row_mean(item, mask), count > min(self.quotas))
        components["lcron_e2e"] = e2e.detach()
        for name, lv in zip(self.names, self.weights.log_var.detach(), strict=True):
            components[f"lcron_weight_{name}"] = torch.exp(0.5 * lv)
        return ObjectiveOutput(self.weights(singles) + e2e, components)


class LCRONNeuralSortObjective(LCRONObjective):
    """``lcron-neuralsort``: LCRON with NeuralSort whatever ``lcron_sort`` says."""

    fixed_sort = "neuralsort"


class LCRONSoftSortObjective(LCRONObjective):
    """``lcron-softsort``: LCRON with SoftSort whatever ``lcron_sort`` says."""

    fixed_sort = "softsort"


class LCRONDiffSortObjective(LCRONObjective):
    """``lcron-diffsort``: LCRON with DiffSort whatever ``lcron_sort`` says."""

    fixed_sort = "diffsort"
