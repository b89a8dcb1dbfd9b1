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

import numpy as np
import torch
from torch import Tensor

from cascadelab.operators._checks import check_k, check_positive, check_scores


def lapsum_topk(scores: Tensor, k: int | float | Tensor, alpha: float) -> Tensor:
    """LapSum soft top-k of ``scores`` (..., n): values in [0, 1], every row sums to ``min(k, n)``.

    Args:
        scores: ``(..., n)`` floating tensor, last dim = items, higher = better.
        k: number > 0, or a tensor of shape ``scores.shape[:-1]``.
        alpha: scale > 0 (the reference uses 5.0 on raw logits); smaller = closer to the hard mask.

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
        if _host(y) and y.numel() <= _NUMPY_MAX_ELEMENTS:  # launch-bound: all in NumPy float64
            yn = y.to(torch.float64).numpy()
            d = yn - _solve_small_np(yn, kk)[:, None]
            fn = np.exp(-np.abs(d)) * 0.5
            f, p = torch.from_numpy(fn).to(cdtype), torch.from_numpy(np.where(d > 0, 1.0 - fn, fn)).to(cdtype)
        else:
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
    sorted row (ascending) as two float64 cumulative sums of e^(+-(y - r)), r = the row's mid-range: a
    cumsum plus an exp is ~10x cheaper than ``logcumsumexp`` on CPU, and with the row's half-range at most
    ``_MAX_HALF_SPAN`` (300) every term and sum stays inside float64 (e^+-300; products >= e^-600). Wider
    rows, where that could over- or underflow, take :func:`_solve_threshold_logspace` (two
    ``logcumsumexp``). sum_i F(y_i - y_j) = (a_j - b_j) / 2 + n - 1 - j is non-increasing in j, so the
    segment [y_m, y_(m+1)) holding t is a count, and :func:`_segment_solve` gives t in closed form there.
    On CPU the O(B) solve runs in NumPy (a NumPy call on a small array costs about a microsecond, a
    torch kernel several); CPU problems of at most ``_NUMPY_MAX_ELEMENTS`` skip torch altogether
    (:func:`_solve_small_np`, called by the forward). Other devices stay in torch.
    """
    ys_t = torch.sort(y, dim=1).values.to(torch.float64)
    t = _solve_sorted(ys_t, k)
    if _host(y):
        wide = torch.nonzero(ys_t[:, -1] - ys_t[:, 0] > 2 * _MAX_HALF_SPAN).flatten()
        if wide.numel():
            t[wide.numpy()] = _solve_threshold_logspace(y.index_select(0, wide), _rows_of(k, wide))[:, 0].double()
        return torch.from_numpy(t).to(y.dtype).unsqueeze(1)
    wide = ys_t[:, -1:] - ys_t[:, :1] > 2 * _MAX_HALF_SPAN
    if bool(wide.any()):
        t = torch.where(wide, _solve_threshold_logspace(y, k).to(t.dtype), t)
    return t.to(y.dtype)


def _host(t: Tensor) -> bool:
    """Whether the O(B) work runs in NumPy (CPU tensors); the torch-only path serves other devices (and
    is tested on CPU by patching this)."""
    return t.device.type == "cpu"


_MAX_HALF_SPAN = 300.0
# Up to this many elements the CPU forward runs wholly in NumPy float64; above it torch's threads win.
_NUMPY_MAX_ELEMENTS = 1 << 14


def _solve_small_np(y: np.ndarray, k: Tensor | float) -> np.ndarray:
    """:func:`_solve_threshold` wholly in NumPy float64 for a small CPU problem; ``y`` (B, n). Returns (B,)."""
    ys = np.sort(y, axis=1)
    t = _solve_sorted_np(ys, k if isinstance(k, float) else k.double().numpy()[:, 0])
    wide = np.flatnonzero(ys[:, -1] - ys[:, 0] > 2 * _MAX_HALF_SPAN)
    if wide.size:
        rows = torch.from_numpy(wide)
        t[wide] = _solve_threshold_logspace(torch.from_numpy(y).index_select(0, rows), _rows_of(k, rows))[:, 0]
    return t


def _rows_of(k: Tensor | float, rows: Tensor) -> Tensor | float:
    return k if isinstance(k, float) else k.index_select(0, rows.to(k.device))


def _solve_sorted(ys: Tensor, k: Tensor | float) -> np.ndarray | Tensor:
    """t per row from the sorted float64 rows ``ys`` (B, n) with half-range <= ``_MAX_HALF_SPAN``.

    On CPU returns a NumPy (B,) array (the O(B) solve in NumPy), elsewhere a (B, 1) tensor.
    """
    n = ys.shape[1]
    z = torch.sub(ys, (ys[:, :1] + ys[:, -1:]) * 0.5).exp_()  # e^(y_i - r)
    a = torch.cumsum(z, 1).div_(z)  # a_j in [1, j + 1]
    tail = torch.flip(z, (1,)).reciprocal_().cumsum_(1)  # reversed: sum_{i>=j} e^(r - y_i) at column n-1-j
    after = torch.flip(tail, (1,))  # sum_{i>=j} e^(r - y_i)
    bb = torch.empty_like(z)
    torch.mul(z[:, :-1], after[:, 1:], out=bb[:, :-1])  # b_j = sum_{i>j} e^(y_j - y_i)
    bb[:, -1] = 0.0
    g = torch.sub(a, bb).mul_(0.5).add_(_countdown(n, ys.device, ys.dtype)[1])
    m = (g >= k).sum(1, keepdim=True)  # t lies in [y_m, y_(m+1)); m = 0: left of y_1
    if _host(ys):
        return _solve_at_counts_np(ys.numpy(), a.numpy(), bb.numpy(), m.numpy()[:, 0],
                                   k if isinstance(k, float) else k.double().numpy()[:, 0])
    ref = (m - 1).clamp_min(0)
    return _segment_solve(ys.gather(1, ref), a.gather(1, ref).log(), bb.gather(1, ref).log(),
                          bb[:, :1].log1p(), n - m.to(ys.dtype) - k, m)


def _solve_sorted_np(ys: np.ndarray, k: np.ndarray | float) -> np.ndarray:
    """:func:`_solve_sorted` in NumPy: ``ys`` (B, n) sorted float64 rows, ``k`` float or (B,). Returns (B,)."""
    n = ys.shape[1]
    with np.errstate(all="ignore"):  # wide rows over- or underflow here (inf / inf); they are redone
        z = np.exp(ys - 0.5 * (ys[:, :1] + ys[:, -1:]))
        a = np.cumsum(z, axis=1) / z
        after = np.cumsum(1.0 / z[:, ::-1], axis=1)[:, ::-1]  # sum_{i>=j} e^(r - y_i)
        bb = np.zeros_like(z)
        np.multiply(z[:, :-1], after[:, 1:], out=bb[:, :-1])  # b_j = sum_{i>j} e^(y_j - y_i)
        m = np.count_nonzero(0.5 * (a - bb) + np.arange(n - 1, -1, -1) >= (k if isinstance(k, float) else k[:, None]),
                             axis=1)
    return _solve_at_counts_np(ys, a, bb, m, k)


def _solve_at_counts_np(ys: np.ndarray, a: np.ndarray, bb: np.ndarray, m: np.ndarray,
                        k: np.ndarray | float) -> np.ndarray:
    """t per row (B,) from the sorted rows ``ys``, their row sums ``a``, ``bb`` (B, n) and segment counts
    ``m`` (B,): the closed form of :func:`_segment_solve_np` at y_max(m,1)."""
    b, n = ys.shape
    rows, ref = np.arange(b), np.maximum(m - 1, 0)
    with np.errstate(all="ignore"):  # log(0) = -inf for b at m = n is the linear limit
        return _segment_solve_np(ys[rows, ref], np.log(a[rows, ref]), np.log(bb[rows, ref]), np.log1p(bb[:, 0]),
                                 n - m - k, m)


def _solve_threshold_logspace(y: Tensor, k: Tensor | float) -> Tensor:
    """:func:`_solve_threshold` through two ``logcumsumexp`` (any spread of values; ~10x slower). (B, 1)."""
    n = y.shape[1]
    ys = torch.sort(y, dim=1).values  # ascending
    # log a_j = log sum_{i<=j} e^(y_i - y_j) in [0, log j];  log b_j = log sum_{i>j} e^(y_j - y_i)
    log_a = torch.logcumsumexp(ys, dim=1).sub_(ys)
    rev = torch.flip(ys, dims=(1,)).neg_()
    log_b = torch.logcumsumexp(rev, dim=1)  # reversed: log sum_{i>=j} e^-y_i at column n-1-j
    torch.index_select(log_b, 1, _countdown(n, y.device, y.dtype)[0], out=rev)  # rev_j = log sum_{i>=j} e^-y_i
    torch.add(ys[:, :-1], rev[:, 1:], out=log_b[:, :-1])
    log_b[:, -1] = -torch.inf
    g_at = torch.exp(log_a).sub_(log_b.exp()).mul_(0.5).add_(_countdown(n, y.device, y.dtype)[1])
    m = (g_at >= k).sum(1, keepdim=True)
    ref = (m - 1).clamp_min(0)
    return _segment_solve(ys.gather(1, ref), log_a.gather(1, ref), log_b.gather(1, ref), ys[:, :1] + rev[:, :1],
                          n - m.to(y.dtype) - k, m)


_COUNTDOWNS: dict = {}


def _countdown(n: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(n-1, ..., 0) as int64 and as ``dtype`` on ``device``, cached (two fewer kernels per call)."""
    key = (n, device, dtype)
    hit = _COUNTDOWNS.get(key)
    if hit is None:
        if len(_COUNTDOWNS) > 64:
            _COUNTDOWNS.clear()
        idx = torch.arange(n - 1, -1, -1, device=device)
        hit = _COUNTDOWNS[key] = (idx, idx.to(dtype))
    return hit


def _segment_solve_np(p: np.ndarray, la: np.ndarray, lb: np.ndarray, lb0: np.ndarray, c: np.ndarray,
                      m: np.ndarray) -> np.ndarray:
    """:func:`_segment_solve` in NumPy float64 for CPU; all arguments (B,)."""
    with np.errstate(all="ignore"):
        la = np.where(m > 0, la, -np.inf)
        lb = np.where(m > 0, lb, lb0)
        log_w = np.log(np.abs(c)) - 0.5 * (la + lb)
        sign = np.sign(c)
        ash = np.where(log_w > 20.0, sign * (log_w + _LN2), np.arcsinh(sign * np.exp(np.minimum(log_w, 20.0))))
        log_v = 0.5 * (la - lb) + ash
        log_v = np.where(np.isinf(la), np.log(2.0 * c) - lb, log_v)
        log_v = np.where(np.isinf(lb), la - np.log(-2.0 * c), log_v)
    return p + log_v


_LN2 = 0.6931471805599453


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
