"""What every cascade objective returns, and the helpers they share."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class ObjectiveOutput:
    """``loss``: scalar to back-propagate; ``components``: named detached scalars for logging."""

    loss: Tensor
    components: dict[str, Tensor]


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over ``mask`` (normalised by the valid count, not by all slots); 0 if empty.

    Entries outside the mask are dropped with ``where`` (not multiplied by 0), so an inf or NaN there
    reaches neither the value nor the gradient.
    """
    m = mask.to(x.dtype)
    return torch.where(m > 0, x * m, torch.zeros_like(x)).sum() / m.sum().clamp_min(1.0)


def bce_with_logits(logits: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Masked-mean binary cross-entropy on logits. ``logits, target, mask: [B, n]``."""
    loss = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none")
    return masked_mean(loss, mask)


def bce_from_log_prob(log_p: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Masked-mean BCE of a probability given as ``log p`` (stable for products of sigmoids)."""
    log_p = log_p.clamp(max=-1e-7)
    log_not_p = torch.log(-torch.expm1(log_p))
    t = target.to(log_p.dtype)
    return masked_mean(-(t * log_p + (1 - t) * log_not_p), mask)


class UncertaintyWeights(nn.Module):
    """Kendall et al. uncertainty weighting with a log-variance parameter per term.

    ``combine(losses) = sum_i 0.5 * exp(-lv_i) * L_i + 0.5 * lv_i``, i.e. L/(2 w^2) + ln w with
    w^2 = exp(lv). The LCRON reference code learns w itself (ln w is NaN for w <= 0); the
    log-variance form is the same function with w = 1 at initialisation and no invalid region.
    """

    def __init__(self, num_terms: int):
        super().__init__()
        self.log_var = nn.Parameter(torch.zeros(num_terms))

    def forward(self, losses: list[Tensor]) -> Tensor:
        stacked = torch.stack(losses)
        return (0.5 * torch.exp(-self.log_var) * stacked + 0.5 * self.log_var).sum()


EPS = 1e-6  # inside every log of the sorting-based and probability losses (as the LCRON code)
FILL_MARGIN = 1e3  # how far below a row's lowest valid score invalid candidates are placed


def default_ks(num_stages: int, ks: list[int] | None = None) -> list[int]:
    """The stage cut-offs: ``ks`` when given, else the RecFlow cascades' ([30, 20] or [40, 30, 20])."""
    if ks is not None:
        if len(ks) != num_stages:
            raise ValueError(f"ks: expected {num_stages} stage cut-offs, got {list(ks)}")
        return [int(k) for k in ks]
    defaults = {1: [20], 2: [30, 20], 3: [40, 30, 20]}
    if num_stages not in defaults:
        raise ValueError(f"ks: a {num_stages}-stage cascade needs explicit stage cut-offs")
    return defaults[num_stages]


def fill_invalid(scores: Tensor, mask: Tensor, margin: float = FILL_MARGIN) -> Tensor:
    """``scores`` with every invalid entry set to ``min(valid scores of the row) - margin``.

    For operators without a mask argument: the fill is finite (operators reject inf), constant
    (no gradient reaches padded logits) and strictly below every valid score, so padded candidates
    take the last positions of any sort. Rows without a valid candidate are filled with ``-margin``.
    """
    low = scores.detach().masked_fill(~mask, float("inf")).amin(-1, keepdim=True)
    low = torch.where(torch.isfinite(low), low, torch.zeros_like(low)) - margin
    return torch.where(mask, scores, low)


def row_mean(x: Tensor, mask: Tensor) -> Tensor:
    """``[B]``: per-row mean of ``x: [B, n]`` over ``mask`` (0 for rows without any)."""
    m = mask.to(x.dtype)
    return torch.where(mask, x, torch.zeros_like(x)).sum(-1) / m.sum(-1).clamp_min(1.0)


def bce_prob(p: Tensor, target: Tensor, mask: Tensor, eps: float = EPS) -> Tensor:
    """Masked-mean BCE of probabilities ``p`` in [0, 1]: ``-[y ln(p + eps) + (1 - y) ln(1 - p + eps)]``."""
    t = target.to(p.dtype)
    loss = -(t * torch.log(p.clamp(0.0, 1.0) + eps) + (1 - t) * torch.log((1 - p).clamp(0.0, 1.0) + eps))
    return masked_mean(loss, mask)


def valid_positions(mask: Tensor) -> Tensor:
    """``[B, n]`` bool: sort position ``k`` is filled by a valid item (``k < count``).

    With invalid candidates filled below every valid one (:func:`fill_invalid`), the valid items take
    the first ``count`` rows of a descending soft permutation. This is the reference's "sequence mask"
    m-bar, but applied to positions (rows) only; items (columns) use the real mask.
    """
    count = mask.sum(-1, keepdim=True)
    return torch.arange(mask.shape[-1], device=mask.device) < count
