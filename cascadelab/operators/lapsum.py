"""LapSum soft top-k (Struski et al., ICML 2025, arXiv 2503.06242).

With F the standard Laplace CDF (F(d) = e^d / 2 for d <= 0, 1 - e^-d / 2 for d > 0):

    p_i = F(scores_i / alpha - t),   t chosen so that sum_i p_i = k.

Parametrisation and sign convention: ``alpha > 0`` is a *scale* (a temperature): larger alpha = softer,
alpha -> 0 gives the hard top-k mask. This is the parametrisation of the authors' pure-PyTorch
``soft_top_k(r, k, alpha, descending=False)`` (``r / alpha - b``), which the DFTopK reference code calls
with ``alpha = 5`` on raw logits; that call selects the LARGEST scores, and so does this function.
The authors' C++ extension instead folds the direction into the sign of alpha; here alpha must be
positive and the direction is always "largest".

Forward, O(n log n): sort the scaled scores y ascending. On the segment between the m-th and (m+1)-th
sorted values the constraint reads e^-t L_m / 2 + (n - m) - e^t R_m / 2 = k with L_m = sum_{i<=m} e^y_i,
R_m = sum_{i>m} e^-y_i, a quadratic in e^t solved in closed form after locating m (the constraint is
monotone in t, so m is a count). The authors compute L and R with two ``logcumsumexp``; here they are
two float64 cumulative sums of e^(+-(y - mid-range)) (~10x cheaper on CPU; exact in range for rows whose
spread in y is at most 600, wider rows take the log-space form). Backward, O(n), analytic (implicit
function theorem): with f_i = F'(d_i) = e^-|d_i| / 2 and q = f / sum(f), grad_scores = f * (g - <q, g>)
/ alpha.

``k`` may be a python number or a per-row tensor (fractional k is allowed, as in the paper); rows with
k >= n return all ones (zero gradient), the limit of the construction.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cascadelab.operators._checks import check_k, check_positive, check_scores


def lapsum_topk(scores: Tensor, k: int | float | Tensor, alpha: float = 5.0) -> Tensor:
    """LapSum soft top-k of ``scores`` (..., n): values in [0, 1], every row sums to ``min(k, n)``.

    Args:
        scores: ``(..., n)`` floating tensor, last dim = items, higher = better.
        k: number > 0, or a tensor of shape ``scores.shape[:-1]``.
        alpha: scale > 0 (5, the DFTopK repository's value on raw logits); smaller = closer to the hard mask.

    Raises:
        ValueError: naming the argument, for bad scores, k <= 0, alpha <= 0 or non-finite.
    """
    check_scores(scores, "scores")
    k = check_k(k, scores, "k", integer=False)
    alpha = check_positive(alpha, "alpha")
    return _LapSumTopK.apply(scores, k, alpha)


class _LapSumTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, k, alpha):
        shape, n = scores.shape, scores.shape[-1]
        cdtype = torch.float32 if scores.dtype in (torch.float16, torch.bfloat16) else scores.dtype
        y = scores.reshape(-1, n).to(cdtype) / alpha
        if isinstance(k, Tensor):
            kk = k.reshape(-1, 1).to(cdtype)
            full = kk >= n  # (B, 1): every item selected
            full = full if bool(full.any()) else None
            if full is not None:
                kk = torch.where(full, torch.full_like(kk, n - 0.5), kk)
        else:
            full = None if k < n else torch.ones_like(y[:, :1], dtype=torch.bool)
            kk = float(k) if k < n else n - 0.5
        d = y.sub_(_solve_threshold(y, kk))  # d = y - t, in place
        f = d.abs().neg_().exp_().mul_(0.5)  # F'(d) = exp(-|d|) / 2, also F(d) for d <= 0
        p = torch.where(d > 0, torch.rsub(f, 1.0), f, out=d)  # d is not needed after this: reuse it
        if full is not None:
            p.masked_fill_(full, 1.0)
        ctx.save_for_backward(f, full)
        ctx.alpha, ctx.shape = alpha, shape
        return p.to(scores.dtype).reshape(shape)

    @staticmethod
    def backward(ctx, grad_out):
        f, full = ctx.saved_tensors  # f = F'(d) = exp(-|d|) / 2
        g = grad_out.reshape(f.shape).to(f.dtype)
        gbar = (g * f).sum(1, keepdim=True) / f.sum(1, keepdim=True).clamp_min(torch.finfo(f.dtype).tiny)
        gx = torch.sub(g, gbar).mul_(f).div_(ctx.alpha)  # f * (g - <q, g>) / alpha, q = f / sum(f)
        if full is not None:
            gx.masked_fill_(full, 0.0)
        return gx.to(grad_out.dtype).reshape(ctx.shape), None, None


def _solve_threshold(y: Tensor, k: Tensor | float) -> Tensor:
    """t with sum_i F(y_i - t) = k, per row of y (B, n); requires 0 < k < n (a float or (B, 1)). Returns (B, 1).

    One sort, then the row sums a_j = sum_{i<=j} e^(y_i - y_j) and b_j = sum_{i>j} e^(y_j - y_i) of the
    sorted row (ascending) as two float64 cumulative sums of e^(+-(y - r)), r = the row's mid-range: with
    the row's half-range at most ``_MAX_HALF_SPAN`` (300) every term and sum stays inside float64
    (e^+-300; products >= e^-600). Wider rows, where that could over- or underflow, take
    :func:`_solve_threshold_logspace` (two ``logcumsumexp``). sum_i F(y_i - y_j) = (a_j - b_j) / 2 + n - 1 - j
    is non-increasing in j, so the segment [y_m, y_(m+1)) holding t is a count, and :func:`_segment_solve`
    gives t in closed form there.
    """
    ys = torch.sort(y, dim=1).values.to(torch.float64)
    t = _solve_sorted(ys, k)
    wide = ys[:, -1:] - ys[:, :1] > 2 * _MAX_HALF_SPAN
    if bool(wide.any()):
        t = torch.where(wide, _solve_threshold_logspace(y, k).to(t.dtype), t)
    return t.to(y.dtype)


_MAX_HALF_SPAN = 300.0


def _solve_sorted(ys: Tensor, k: Tensor | float) -> Tensor:
    """t per row (B, 1) from the sorted float64 rows ``ys`` (B, n) with half-range <= ``_MAX_HALF_SPAN``."""
    n = ys.shape[1]
    z = torch.sub(ys, (ys[:, :1] + ys[:, -1:]) * 0.5).exp_()  # e^(y_i - r)
    a = torch.cumsum(z, 1).div_(z)  # a_j in [1, j + 1]
    after = torch.flip(torch.flip(z, (1,)).reciprocal_().cumsum_(1), (1,))  # sum_{i>=j} e^(r - y_i)
    bb = torch.zeros_like(z)
    torch.mul(z[:, :-1], after[:, 1:], out=bb[:, :-1])  # b_j = sum_{i>j} e^(y_j - y_i)
    g = torch.sub(a, bb).mul_(0.5).add_(_countdown(n, ys))
    m = (g >= k).sum(1, keepdim=True)  # t lies in [y_m, y_(m+1)); m = 0: left of y_1
    ref = (m - 1).clamp_min(0)
    return _segment_solve(ys.gather(1, ref), a.gather(1, ref).log(), bb.gather(1, ref).log(),
                          bb[:, :1].log1p(), n - m.to(ys.dtype) - k, m)


def _solve_threshold_logspace(y: Tensor, k: Tensor | float) -> Tensor:
    """:func:`_solve_threshold` through two ``logcumsumexp``, for any spread of values. Returns (B, 1)."""
    n = y.shape[1]
    ys = torch.sort(y, dim=1).values  # ascending
    # log a_j = log sum_{i<=j} e^(y_i - y_j) in [0, log j];  log b_j = log sum_{i>j} e^(y_j - y_i)
    log_a = torch.logcumsumexp(ys, dim=1).sub_(ys)
    rev = torch.flip(ys, dims=(1,)).neg_()
    log_b = torch.logcumsumexp(rev, dim=1)  # reversed: log sum_{i>=j} e^-y_i at column n-1-j
    rev = torch.flip(log_b, dims=(1,))  # rev_j = log sum_{i>=j} e^-y_i
    torch.add(ys[:, :-1], rev[:, 1:], out=log_b[:, :-1])
    log_b[:, -1] = -torch.inf
    g_at = torch.exp(log_a).sub_(log_b.exp()).mul_(0.5).add_(_countdown(n, y))
    m = (g_at >= k).sum(1, keepdim=True)
    ref = (m - 1).clamp_min(0)
    return _segment_solve(ys.gather(1, ref), log_a.gather(1, ref), log_b.gather(1, ref), ys[:, :1] + rev[:, :1],
                          n - m.to(y.dtype) - k, m)


def _countdown(n: int, like: Tensor) -> Tensor:
    """(n-1, ..., 0) with the dtype and device of ``like``: the count of items above each sorted position."""
    return torch.arange(n - 1, -1, -1, device=like.device, dtype=like.dtype)


def _segment_solve(p: Tensor, la: Tensor, lb: Tensor, lb0: Tensor, c: Tensor, m: Tensor) -> Tensor:
    """On the segment: b v^2 - 2 c v - a = 0 for v = e^(t - p), with p = y_max(m,1), la = log a_p,
    lb = log b_p, c = n - m - k, lb0 = log sum_i e^(y_1 - y_i) (used when m = 0). Writing v = sqrt(a/b) e^u
    gives sinh(u) = c / sqrt(ab), so log v = (la - lb)/2 + asinh(c e^(-(la+lb)/2)): no cancellation, no
    underflow of a*b. m = 0 (a = 0) and m = n (b = 0) are the two linear limits. All (B, 1)."""
    la = torch.where(m > 0, la, torch.full_like(p, -torch.inf))
    lb = torch.where(m > 0, lb, lb0)
    log_w = torch.log(c.abs()) - 0.5 * (la + lb)
    big = log_w > 20.0  # asinh(w) = sign(w) (log 2|w| + O(w^-2))
    ash = torch.where(big, torch.sign(c) * (log_w + 0.6931471805599453),
                      torch.asinh(torch.sign(c) * torch.exp(log_w.clamp_max(20.0))))
    log_v = 0.5 * (la - lb) + ash
    log_v = torch.where(torch.isinf(la), torch.log(2.0 * c) - lb, log_v)
    log_v = torch.where(torch.isinf(lb), la - torch.log(-2.0 * c), log_v)
    return p + log_v
