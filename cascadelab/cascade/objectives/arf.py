"""ARF and ARF-v2: per-stage relaxed Recall@K@m plus a listwise global term (kwai/LCRON ``arf.py``)."""

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
from cascadelab.cascade.objectives.sorting import label_permutation, memberships, soft_permutation, top_mass


class ARFObjective(nn.Module):
    """ARF (Wang et al. 2024): every stage on its own, ``L = sum_s [G_s / (2 w_s^2) + ln w_s + R_s]``.

    For stage s with quota ``m = ks[s]`` and soft permutation ``P = NeuralSort(s_s; arf_tau)`` (``[B, n, n]``,
    rows = positions; invalid candidates sorted last and masked out), y = ground truth, y-bar = valid
    non-ground-truth, c = valid count per request:

    * ``R_s`` (relaxed recall), over requests with ``c > m``:
      ARF:    ``(1/c) sum_i -ln((1/m) sum_{k<m} P[k, i] + eps) y_i``;
      ARF-v2: ``(1/c) sum_i [-ln(pi_m(i) + eps) y_i - ln(beta_m(i) + eps) ybar_i]`` with the column-normalised
      memberships of :func:`memberships` (LCRON's L_single at the stage's own m);
    * ``G_s`` (global listwise CE), over requests with ``c >= 2``:
      ``(1/c^2) sum_k sum_i -ln(P[k, i] + eps) Lambda[k, i]`` with Lambda the label permutation (uniform in
      tie blocks, :func:`label_permutation`);
    * ``w_s`` is an uncertainty weight on ``G_s`` (log-variance parameter, ``UncertaintyWeights``).

    Deviations from the reference code (kwai/LCRON ``two_stage/arf.py``, ``three_stage/arf.py``): the real validity mask
    (items) and the valid positions (rows) replace the sequence mask; y / y-bar are computed directly
    (no NeuralSort of the labels, padded ground-truth slots are not positives) and Lambda by counting;
    ``G_s`` is normalised by each request's ``c^2`` (reference: ``n^2``) and every request with ``c >= 2``
    counts (reference: only complete requests, ``c >= N``); per-request terms are averaged over the
    requests that pass the gate (reference: divided by B); one summed backward (the stages share no
    parameters, same gradients); no unused ``local_weight``.
    """

    version = 1

    def __init__(self, num_stages: int, ks: list[int] | None = None, arf_tau: float = 200.0):
        super().__init__()
        if arf_tau <= 0:
            raise ValueError(f"arf_tau: expected > 0, got {arf_tau}")
        self.names = stage_names(num_stages)
        self.ks = default_ks(num_stages, ks)
        self.tau = arf_tau
        self.weights = UncertaintyWeights(num_stages)
        self.prefix = "arf" if self.version == 1 else "arf_v2"

    def forward(self, scores: list[Tensor], batch: CascadeBatch) -> ObjectiveOutput:
        mask = batch.mask
        y = batch.ground_truth()
        ybar = mask & ~y
        count = mask.sum(-1)
        lam = label_permutation(batch.label, mask).to(scores[0].dtype)
        global_rows = count >= 2
        globals_, relaxes, components = [], [], {}
        for name, s, m in zip(self.names, scores, self.ks, strict=True):
            perm = soft_permutation(s, mask, "neuralsort", self.tau)
            ce = -(torch.log(perm + EPS) * lam).sum((-2, -1)) / count.clamp_min(1).to(s.dtype) ** 2
            g = masked_mean(ce, global_rows)
            if self.version == 1:
                top, _ = top_mass(perm, m, mask)
                item = -torch.log(top / m + EPS) * y
            else:
                pi, beta = memberships(perm, m, mask)
                item = -torch.log(pi + EPS) * y - torch.log(beta + EPS) * ybar
            r = masked_mean(row_mean(item, mask), count > m)
            globals_.append(g)
            relaxes.append(r)
            components[f"{self.prefix}_global_{name}"] = g.detach()
            components[f"{self.prefix}_relax_{name}"] = r.detach()
        for name, lv in zip(self.names, self.weights.log_var.detach(), strict=True):
            components[f"{self.prefix}_weight_{name}"] = torch.exp(0.5 * lv)
        total = self.weights(globals_) + torch.stack(relaxes).sum()
        return ObjectiveOutput(total, components)


class ARFv2Objective(ARFObjective):
    """ARF-v2: :class:`ARFObjective` with LCRON's two-sided, column-normalised relaxed recall."""

    version = 2
