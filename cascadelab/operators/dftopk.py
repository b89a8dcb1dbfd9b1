"""DFTopK: the O(n) differentiable top-k mask of Zhu et al. (2025, arXiv 2510.11472).

    theta(x) = (x_(k) + x_(k+1)) / 2          x_(j) = j-th largest valid score of the row
    dftopk(x)_i = sigmoid((x_i - theta(x)) / tau)

theta moves with its two items only, weight 1/2 each, as in the official code
(zhangzhen97/DFTOPK, ``theta`` from two ``torch.kthvalue`` calls with autograd through them). With
z = (x - theta) / tau and g = dL/dz, the backward of :class:`_DFTopKLogits` is therefore

    dL/dx_i = g_i / tau - (1/2) [i in {(k), (k+1)}] sum_j g_j / tau.

Small unmasked inputs (at most ``_COMPOSED_MAX`` elements, one int k, float32/float64) take the
official form itself, autograd through the two ``kthvalue`` calls: the same values and gradient, in
fewer kernel launches than the custom Function's fixed cost.

Conventions (deviations from the official code):

* ``mask`` (bool, True = valid): invalid items take no part in theta; ``dftopk`` gives them exactly
  0 and ``dftopk_logits`` gives them the finite logit ``INVALID_LOGIT`` (-1e4), so BCE-with-logits
  with label 0 costs ~0 (exactly 0 in float32) and never NaN. They get zero gradient.
* ``k >= number of valid items c``: every valid item is selected; theta = (smallest valid score) -
  ``SATURATION_MARGIN`` * tau, so the weakest valid item sits at logit +10 (mask ~0.99995) and the
  gradient of theta goes to that item. A row with no valid item gets theta = 0 (all outputs invalid).
* Ties: if x_(k) == x_(k+1) theta equals that value and its gradient goes to the tied items that the
  selection returns (one or two of them).
* float16/bfloat16 inputs are selected in float32; the logits are computed in the input dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cascadelab.operators._checks import check_k, check_mask, check_positive, check_scores

INVALID_LOGIT = -1.0e4
SATURATION_MARGIN = 10.0
_COMPOSED_MAX = 1 << 14  # up to this many elements the plain composition (module docstring)


def dftopk(scores: Tensor, k: int | Tensor, tau: float = 500.0, mask: Tensor | None = None) -> Tensor:
    """Soft top-k mask ``sigmoid((scores - theta) / tau)``, values in (0, 1) (exactly 0 on invalid items).

    Args:
        scores: ``(..., n)`` float16/bfloat16/float32/float64; the last dim indexes items, higher = better.
        k: python int, or an integer tensor of shape ``scores.shape[:-1]`` (one k per row); all > 0.
        tau: temperature > 0 (the DFTopK paper's 500 on raw model logits).
        mask: optional bool tensor shaped like ``scores``; False marks padded/invalid items.

    Returns:
        Tensor shaped like ``scores``. See the module docstring for k >= valid count and ties.

    Raises:
        ValueError: naming the argument, for bad scores (NaN/inf, scalar, empty), k <= 0, tau <= 0 or
            non-finite, or a mask of another shape.
    """
    return torch.sigmoid(dftopk_logits(scores, k, tau, mask))


def dftopk_logits(scores: Tensor, k: int | Tensor, tau: float = 500.0, mask: Tensor | None = None) -> Tensor:
    """The DFTopK logits ``(scores - theta) / tau``, for ``binary_cross_entropy_with_logits``.

    Same arguments as :func:`dftopk`. Invalid items get ``INVALID_LOGIT`` (-1e4, finite in every float
    dtype) and zero gradient.
    """
    check_scores(scores, "scores")
    k = check_k(k, scores, "k")
    tau = check_positive(tau, "tau")
    mask = check_mask(mask, scores, "mask")
    n = scores.shape[-1]
    if mask is None and isinstance(k, int) and k < n and scores.numel() <= _COMPOSED_MAX \
            and scores.dtype in (torch.float32, torch.float64):
        kth = torch.kthvalue(scores, n - k + 1, dim=-1, keepdim=True).values  # k-th largest
        nxt = torch.kthvalue(scores, n - k, dim=-1, keepdim=True).values  # (k+1)-th largest
        return torch.add(scores, kth + nxt, alpha=-0.5).div_(tau)
    return _DFTopKLogits.apply(scores, k, tau, mask)


class _DFTopKLogits(torch.autograd.Function):
    """z = (x - theta) / tau; backward: g / tau, minus half its row sum at each of theta's two items."""

    @staticmethod
    def forward(ctx, scores: Tensor, k: int | Tensor, tau: float, mask: Tensor | None) -> Tensor:
        n = scores.shape[-1]
        x = scores.reshape(-1, n)  # (B, n)
        valid = None if mask is None else mask.reshape(-1, n)
        xs = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        theta, items = _threshold(xs, k.reshape(-1) if isinstance(k, Tensor) else k, valid, tau)
        z = torch.sub(x, theta.to(x.dtype).unsqueeze(1)).div_(tau)
        if valid is not None:
            z.masked_fill_(~valid, INVALID_LOGIT)
        ctx.save_for_backward(items, valid)
        ctx.tau = tau
        return z.reshape(scores.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):
        items, valid = ctx.saved_tensors
        g = grad.reshape(items.shape[0], -1).div(ctx.tau)  # dz_i/dx_i = 1 / tau
        if valid is not None:
            g.masked_fill_(~valid, 0.0)
        row = g.sum(1, keepdim=True, dtype=torch.float32 if g.dtype.itemsize < 4 else g.dtype)
        g.scatter_add_(1, items, row.mul(-0.5).to(g.dtype).expand(-1, 2))  # dL/dtheta = -row, 1/2 per item
        return g.reshape(grad.shape), None, None, None


def _threshold(x: Tensor, k: int | Tensor, valid: Tensor | None, tau: float) -> tuple[Tensor, Tensor]:
    """theta of every row of ``x`` (B, n) and the two items that carry its gradient (B, 2); no autograd.

    ``k``: int or (B,) int64, all > 0; ``valid``: (B, n) bool or None (all valid). Rows with
    ``k < c`` valid items: the midpoint of x_(k) and x_(k+1) and their indices. Rows with ``k >= c > 0``:
    (smallest valid score) - ``SATURATION_MARGIN`` * tau, and that item's index twice. Rows with c = 0:
    theta = 0.
    """
    b, n = x.shape
    x = x.detach()
    xs = x if valid is None else x.masked_fill(~valid, -math.inf)  # invalid items below every valid one
    if isinstance(k, int):
        j = min(k, n - 1)  # rows with k >= n saturate below
        kth, i_kth = torch.kthvalue(xs, n - j + 1, dim=1)  # j-th largest
        nxt, i_nxt = torch.kthvalue(xs, n - j, dim=1)  # (j+1)-th largest
        pair, items = torch.stack([kth, nxt], 1), torch.stack([i_kth, i_nxt], 1)
    else:
        j = k.clamp(max=n - 1)
        top = torch.topk(xs, int(j.max()) + 1, dim=1)  # sorted, largest first
        pos = torch.stack([j - 1, j], 1)
        pair, items = top.values.gather(1, pos), top.indices.gather(1, pos)
    theta = pair.mean(1)
    if valid is None and isinstance(k, int) and k < n:  # no row saturates
        return theta, items
    count = torch.full((b,), n, device=x.device) if valid is None else valid.sum(1)
    full = count <= torch.as_tensor(k, device=x.device)  # every valid item selected
    low, i_low = (x if valid is None else x.masked_fill(~valid, math.inf)).min(1)
    theta = torch.where(full, low - SATURATION_MARGIN * tau, theta).masked_fill_(count == 0, 0.0)
    items = torch.where(full.unsqueeze(1), i_low.unsqueeze(1), items)
    return theta, items
