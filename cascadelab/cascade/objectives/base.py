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
    """Mean of ``x`` over ``mask`` (normalised by the valid count, not by all slots); 0 if empty."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1.0)


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
    w^2 = exp(lv). The reference code learns w itself (ln w is NaN for w <= 0, notes §6 item 9); the
    log-variance form is the same function with w = 1 at initialisation and no invalid region.
    """

    def __init__(self, num_terms: int):
        super().__init__()
        self.log_var = nn.Parameter(torch.zeros(num_terms))

    def forward(self, losses: list[Tensor]) -> Tensor:
        stacked = torch.stack(losses)
        return (0.5 * torch.exp(-self.log_var) * stacked + 0.5 * self.log_var).sum()
