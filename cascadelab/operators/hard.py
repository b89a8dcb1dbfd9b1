"""Hard top-k mask for evaluation (not differentiable)."""

from __future__ import annotations

import torch
from torch import Tensor

from cascadelab.operators._checks import check_k, check_mask, check_scores


def hard_topk_mask(scores: Tensor, k: int | Tensor, mask: Tensor | None = None) -> Tensor:
    """Bool mask of the ``k`` highest valid scores of every row.

    Args:
        scores: ``(..., n)`` floating tensor, higher = better.
        k: python int, or an integer tensor of shape ``scores.shape[:-1]``; all > 0.
        mask: optional bool tensor shaped like ``scores``; invalid (False) items are never selected.

    Returns:
        Bool tensor shaped like ``scores`` with exactly ``min(k, valid count)`` True per row. Ties are
        broken towards the lower index (stable sort), so the result is deterministic.

    Raises:
        ValueError: naming the argument, for bad scores, k <= 0 or a mask of another shape.
    """
    check_scores(scores, "scores")
    k = check_k(k, scores, "k")
    mask = check_mask(mask, scores, "mask")
    with torch.no_grad():
        x = scores if mask is None else scores.masked_fill(~mask, -torch.inf)
        order = torch.sort(x, dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device)
                                                .expand_as(order))
        kk = k.unsqueeze(-1) if isinstance(k, Tensor) else k
        out = rank < kk
        return out if mask is None else out & mask
