"""DFTopK: the O(n) differentiable top-k mask of Zhu et al. (2025, arXiv 2510.11472).

    theta(x) = (x_(k) + x_(k+1)) / 2          x_(j) = j-th largest valid score of the row
    dftopk(x)_i = sigmoid((x_i - theta(x)) / tau)

The gradient reaches theta only through the two items x_(k) and x_(k+1) (weight 1/2 each), as in the
official code, which finds them with two ``torch.kthvalue`` calls. Here the two order statistics come
from one selection (no sort) and the backward is one elementwise pass, a row sum and a two-element
scatter (:class:`_DFTopKFunction`).

Selection (``_kth_pair``) has two exact strategies:

* small problems, or non-CPU devices: one ``torch.kthvalue`` for x_(k+1) plus a masked min for x_(k)
  (``torch.topk`` when k differs between rows; a second ``kthvalue`` for rows of <= 128 items). Up to
  20,000 elements or for rows of <= 128 items (no mask, int k) kernel launches, not elements, cost the
  time: there the logits are composed from two ``kthvalue`` calls with plain autograd (the fewest
  kernels; same math and gradient; measured faster than the custom Function up to 16-20k elements);
* large CPU problems (>= 2**18 elements, float32/float64 rows of 64 .. 2**24 items): a count search
  (``_pair_search``), no sort, no ``topk``/``kthvalue`` on the hot path. A count is one ``gt`` into a
  float buffer plus a row sum; several probes per row share one (P, rows, n) ``gt``. Per row, a is the
  highest probe with count(x > a) >= k and c the lowest with count(x > c) <= k - 1, so x_(k) lies in
  (a, c]. First probe at the Gaussian quantile mu + sd Phi^-1(1 - k/n) (mu, sd from one row sum and one
  row norm; the row min/max come from the NaN/inf check of the public function), then 4 probes around
  the Newton step on the Gaussian density, then 4 probes per step around the regula-falsi point (rows
  whose bracket did not halve in items get an even split in float-bit order instead, safe for any spread
  of values); probes are ``_SPACING`` (4.5) items apart. Rows still searching are copied together (into
  reused scratch memory, ``_scratch``) once they are at most 3/4 of the rows. A row is done once
  count(x > c) >= k - 6: x_(k) and x_(k+1) are then among the 8 items nearest below c, read out by
  repeated ``amin`` of r = 1 / (x - c) with the column index written into the low mantissa bits of r
  (index reductions are ~10x slower on CPU), each pick masked for the next. The pair is certified
  exactly: r with the index bits cleared is exact, so a strictly larger cleared r after the last pick
  proves the picks are the nearest items; they are then ordered by value. Rows not done (ties never
  separate; the search notices a bracket that stops losing items), the last <= 4 rows still searching
  after the third step, and rows not certified (ties at x_(k+1)) go to the small path, so the result is
  always the exact pair. Measured on 2 CPU threads (float32, Gaussian rows, forward +
  BCE-with-logits + backward against the same BCE on x / tau; interleaved medians): at 1024 x 1000
  about 3 steps for 99% of rows, 0.87-0.9x the time of the previous search (which stopped only at a
  probe between x_(k+1) and x_(k), ~7 steps), the whole step 2.8-3.1x that logits floor (1.3-1.5x the
  sigmoid + BCE floor of the issue); 1024 x 10,000: 1.4x the logits floor. Scratch: 2 B n elements per
  thread and dtype, kept while <= 96 MiB (fresh multi-megabyte buffers were page-faulted in on every
  call once the allocator had handed them back).

Conventions (deviations from the official code, documented):

* ``mask`` (bool, True = valid): invalid items take no part in theta; ``dftopk`` gives them exactly
  0 and ``dftopk_logits`` gives them the finite logit ``INVALID_LOGIT`` (-1e4), so BCE-with-logits
  with label 0 costs ~0 (exactly 0 in float32) and never NaN. They get zero gradient.
* ``k >= number of valid items c``: every valid item is selected; theta = (smallest valid score) -
  ``SATURATION_MARGIN`` * tau, so the weakest valid item sits at logit +10 (mask ~0.99995) and the
  gradient of theta goes to that item. A row with no valid item gets theta = 0 (all outputs invalid).
* Ties: if x_(k) == x_(k+1) theta equals that value and its gradient goes to one of the tied items.
* float16/bfloat16 inputs are selected in float32; the logits are computed in the input dtype.
"""

from __future__ import annotations

import math
import statistics
import threading

import numpy as np
import torch
from torch import Tensor

from cascadelab.operators._checks import check_k, check_mask, check_positive, check_scores

_SEARCH_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

INVALID_LOGIT = -1.0e4
SATURATION_MARGIN = 10.0
# Below this many elements (or off CPU) the kthvalue path is cheaper than the threshold search.
_ITERATIVE_MIN_ELEMENTS = 1 << 18
_MAX_SEARCH_STEPS = 24
_ENUM_MAX = 8  # the search stops once x_(k+1) is at most the (this - 1)-th item below its upper probe
_MAX_STALL = 4  # a row whose probes cross no item this many steps in a row takes the direct path
_PROBES = 4  # probes per row and step after the first
_FIRST_SPACING = 4.5  # the second step's probes, in expected item gaps
_SPACING = 4.5  # later probes, in items (regula falsi estimate)
_DIRECT_ROWS = 4  # from the third step on, once this many rows or fewer still search, they take the direct path
_COMPACT_FRACTION = 0.75  # rows still searching are copied together once they are at most this part
# Up to this many elements (no mask, int k) the logits are two kthvalue calls with plain autograd: at batch 1,
# N = 10,000 that step took 420 us against 498 us through the custom Function (2 CPU threads); at 16 x 1000
# 546 against 658; at 32 x 1000 the Function wins (1445 against 1580).
_COMPOSED_MAX = 20_000
_TWO_KTHVALUE_MAX = 4096  # below this many elements per call, two kthvalue calls beat the masked min


def dftopk(scores: Tensor, k: int | Tensor, tau: float, mask: Tensor | None = None) -> Tensor:
    """Soft top-k mask ``sigmoid((scores - theta) / tau)``, values in (0, 1) (exactly 0 on invalid items).

    Args:
        scores: ``(..., n)`` float16/bfloat16/float32/float64; the last dim indexes items, higher = better.
        k: python int, or an integer tensor of shape ``scores.shape[:-1]`` (one k per row); all > 0.
        tau: temperature > 0 (the DFTopK paper uses 500 on raw model logits).
        mask: optional bool tensor shaped like ``scores``; False marks padded/invalid items.

    Returns:
        Tensor shaped like ``scores``. See the module docstring for k >= valid count and ties.

    Raises:
        ValueError: naming the argument, for bad scores (NaN/inf, scalar, empty), k <= 0, tau <= 0 or
            non-finite, or a mask of another shape.
    """
    k, tau, mask, extrema = _validate(scores, k, tau, mask)
    if _use_composed(scores, k, mask):
        return torch.sigmoid(_tiny_logits(scores, k, tau))
    return _DFTopKFunction.apply(scores, k, tau, mask, True, extrema)


def dftopk_logits(scores: Tensor, k: int | Tensor, tau: float, mask: Tensor | None = None) -> Tensor:
    """The DFTopK logits ``(scores - theta) / tau``, for ``binary_cross_entropy_with_logits``.

    Same arguments as :func:`dftopk`. Invalid items get ``INVALID_LOGIT`` (-1e4, finite in every float
    dtype) and zero gradient.
    """
    k, tau, mask, extrema = _validate(scores, k, tau, mask)
    if _use_composed(scores, k, mask):
        return _tiny_logits(scores, k, tau)
    return _DFTopKFunction.apply(scores, k, tau, mask, False, extrema)


def _validate(scores: object, k: object, tau: object, mask: object):
    """The argument checks of the public functions, in order scores, k, tau, mask.

    When the input will take the CPU threshold search (no mask, one int k < n, large), the NaN/inf check
    uses the per-row minimum and maximum, which the search needs anyway (``amin``/``amax`` propagate NaN
    and expose +-inf): one pair of passes instead of two. Returns (k, tau, mask, row extrema or None).
    """
    extrema = None
    if not _takes_search(scores, k, mask):
        check_scores(scores, "scores")
    else:
        x = scores.detach().reshape(-1, scores.shape[-1])
        lo, hi = x.amin(1), x.amax(1)
        if not bool(torch.isfinite(lo).all() & torch.isfinite(hi).all()):
            raise ValueError("'scores' contains NaN or inf")
        extrema = (lo, hi)
    k = check_k(k, scores, "k")
    tau = check_positive(tau, "tau")
    mask = check_mask(mask, scores, "mask")
    return k, tau, mask, extrema


def _takes_search(scores: object, k: object, mask: object) -> bool:
    """True when ``_kth_pair`` will run the threshold search on all rows (decided before validation)."""
    if mask is not None or type(k) is not int or not isinstance(scores, Tensor) or scores.dim() == 0:
        return False
    n = scores.shape[-1]  # rows of <= 128 items take the composed path; half precision is searched in float32
    return 0 < k < n and n > 128 and _searchable(scores, _SEARCH_DTYPES)


def _use_composed(scores: Tensor, k: int | Tensor, mask: Tensor | None) -> bool:
    n = scores.shape[-1]
    return mask is None and isinstance(k, int) and k < n and (scores.numel() <= _COMPOSED_MAX or n <= 128)


def _tiny_logits(scores: Tensor, k: int, tau: float) -> Tensor:
    """Launch-bound regime (<= 20,000 elements or rows <= 128 items): two kthvalue calls with plain autograd
    are the fewest kernels and beat the custom Function's fixed overhead.

    Same math and same gradient (kthvalue routes it to the selected item) as :class:`_DFTopKFunction`.
    """
    n = scores.shape[-1]
    kth = torch.kthvalue(scores, n - k + 1, dim=-1, keepdim=True).values  # k-th largest
    nxt = torch.kthvalue(scores, n - k, dim=-1, keepdim=True).values  # (k+1)-th largest
    return torch.sub(scores, kth + nxt, alpha=0.5).div_(tau)  # (x - theta) / tau in two kernels


class _DFTopKFunction(torch.autograd.Function):
    """z = (x - theta) / tau (optionally sigmoid); backward = g/tau minus its row sum at the 2 theta items."""

    @staticmethod
    def forward(ctx, scores, k, tau, mask, probs, extrema=None):
        shape = scores.shape
        n = shape[-1]
        x = scores.reshape(-1, n)
        valid = None if mask is None else mask.reshape(-1, n)
        kk = k.reshape(-1) if isinstance(k, Tensor) else k
        xc = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        theta, idx, weight = _threshold(xc, kk, valid, tau, extrema)
        z = torch.sub(x, theta.to(x.dtype).unsqueeze(1)).div_(tau)  # (B, n)
        if valid is not None:
            z.masked_fill_(~valid, INVALID_LOGIT)
        out = z
        if probs:
            out = torch.sigmoid_(z)
            if valid is not None:
                out.masked_fill_(~valid, 0.0)
        ctx.save_for_backward(idx, weight, valid, out if probs else None)
        ctx.tau, ctx.probs, ctx.shape = tau, probs, shape
        return out.reshape(shape)

    @staticmethod
    def backward(ctx, grad_out):
        idx, weight, valid, out = ctx.saved_tensors
        g = grad_out.reshape(idx.shape[0], -1)
        if ctx.probs:
            g = torch.ops.aten.sigmoid_backward(g, out)  # g * s * (1 - s), one fused pass
        gx = torch.div(g, ctx.tau)  # dz/dx through the items themselves
        if valid is not None:
            gx.masked_fill_(~valid, 0.0)
        row = gx.sum(-1, keepdim=True, dtype=torch.float32 if gx.dtype.itemsize < 4 else gx.dtype)
        # dL/dtheta = -row, and theta moves with its two items (weight 1/2 each unless stated)
        src = row.mul(-0.5).expand(-1, 2) if weight is None else -row * weight
        gx.scatter_add_(1, idx, src.to(gx.dtype))
        return gx.reshape(ctx.shape), None, None, None, None, None


def _threshold(x: Tensor, k: int | Tensor, valid: Tensor | None, tau: float,
               extrema: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """theta (B,), the items carrying its gradient idx (B, 2), their weights (B, 2) or None (= 1/2 each)."""
    b, n = x.shape
    if valid is None and isinstance(k, int) and k < n:  # the common case: every row selects
        if extrema is not None and _searchable(x):
            return _pair_search(x.detach().contiguous(), k, extrema, theta=True)
        yk, ik, yk1, ik1 = _kth_pair(x, k)
        return torch.add(yk, yk1).mul_(0.5), torch.stack([ik, ik1], 1), None
    theta = x.new_zeros(b)
    idx = torch.zeros(b, 2, dtype=torch.long, device=x.device)
    weight = x.new_zeros(b, 2)
    count = torch.full((b,), n, device=x.device) if valid is None else valid.sum(-1)  # valid items per row
    select = torch.as_tensor(k, device=x.device) < count

    # [1] rows with k < valid count: exact pair x_(k), x_(k+1)
    rows = select.nonzero().squeeze(1)
    if rows.numel() > 0:
        xs = x.index_select(0, rows)
        ks = k.index_select(0, rows) if isinstance(k, Tensor) else k
        if valid is not None:
            with torch.no_grad():
                lo, hi = xs.amin(1, keepdim=True), xs.amax(1, keepdim=True)
            xs = torch.where(valid.index_select(0, rows), xs, lo - (hi - lo) - 1.0)  # below every valid score
        yk, ik, yk1, ik1 = _kth_pair(xs, ks)
        theta[rows] = torch.add(yk, yk1).mul_(0.5)
        idx[rows] = torch.stack([ik, ik1], 1)
        weight[rows] = 0.5

    # [2] rows with 0 < valid count <= k: every valid item selected, theta below the smallest one
    rows = (~select & (count > 0)).nonzero().squeeze(1)
    if rows.numel() > 0:
        xs = x.index_select(0, rows)
        if valid is not None:
            xs = torch.where(valid.index_select(0, rows), xs, torch.full_like(xs, math.inf))
        vmin, imin = xs.min(-1)
        theta[rows] = vmin - SATURATION_MARGIN * tau
        idx[rows] = imin.unsqueeze(1).expand(-1, 2)
        weight[rows] = 0.5
    # rows without valid items keep theta = 0 and zero weight
    return theta, idx, weight


def _kth_pair(x: Tensor, k: int | Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_(k), its index, x_(k+1), its index) per row of ``x`` (B, n); requires 1 <= k < n."""
    if _searchable(x):
        return _pair_search(x.detach().contiguous(), k)
    return _pair_direct(x, k)


def _searchable(x: Tensor, dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64)) -> bool:
    """Whether rows of ``x`` (..., n) can take the CPU count search (``_pair_search``)."""
    n = x.shape[-1]
    return (x.device.type == "cpu" and x.numel() >= _ITERATIVE_MIN_ELEMENTS and 64 <= n < 1 << 24
            and x.dtype in dtypes)


def _pair_direct(x: Tensor, k: int | Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One kthvalue for x_(k+1) and a masked min for x_(k); topk when k differs between rows."""
    n = x.shape[1]
    if isinstance(k, Tensor):
        kmin, kmax = int(k.min()), int(k.max())
        if kmin != kmax:
            vals, inds = torch.topk(x, kmax + 1, dim=1, sorted=True)
            pos = torch.stack([k - 1, k], 1)
            v, i = vals.gather(1, pos), inds.gather(1, pos)
            return v[:, 0], i[:, 0], v[:, 1], i[:, 1]
        k = kmax
    if x.numel() <= _TWO_KTHVALUE_MAX or n <= 128:  # tiny or short rows: a second kthvalue is cheapest
        vk, ik = torch.kthvalue(x, n - k + 1, dim=1)
        vk1, ik1 = torch.kthvalue(x, n - k, dim=1)
        return vk, ik, vk1, ik1
    v, iv = torch.kthvalue(x, n - k, dim=1)  # (k+1)-th largest
    above = x > v.unsqueeze(1)
    u, iu = torch.where(above, x, math.inf).min(1)
    tie = above.sum(1) < k  # fewer than k items strictly above: x_(k) == x_(k+1)
    return torch.where(tie, v, u), torch.where(tie, iv, iu), v, iv


def _pair_search(x: Tensor, k: int | Tensor, extrema: tuple[Tensor, Tensor] | None = None, theta: bool = False):
    """Count search for a threshold between x_(k+1) and x_(k), then a certified read-out (module docstring).

    CPU only; ``x`` (B, n) contiguous float32/float64, 64 <= n < 2**24, 1 <= k < n; ``extrema``: the row
    minima and maxima if already computed. Returns (x_(k), its index, x_(k+1), its index), or with
    ``theta`` (theta, the two indices (B, 2), None) as ``_threshold`` does. The O(B n) passes run in
    torch on reused scratch memory (:func:`_scratch`), the O(B) bookkeeping in NumPy on zero-copy views
    (a torch op on a 1024-vector costs microseconds, a NumPy op about one).
    Per row a bracket (a, c] with fa = count(x > a) - k >= 0 > fc = count(x > c) - k (x_(k) is in it). A
    row is done when fc >= 2 - ``_ENUM_MAX``: the 2 - fc items nearest below c hold x_(k) and x_(k+1)
    (:func:`_read_pair`).
    """
    b, n = x.shape
    npdt = np.float32 if x.dtype == torch.float32 else np.float64
    kv = k.numpy().astype(np.float64) if isinstance(k, Tensor) else np.full(b, float(k))
    size = 2 * b * n
    work = _scratch(size, x.dtype)
    np_err = np.seterr(all="ignore")
    try:
        # [1] start: the Gaussian quantile of each row, t0 = mu + sd Phi^-1(1 - k/n), kept off the extremes
        lo_t, hi_t = (x.amin(1), x.amax(1)) if extrema is None else extrema
        lo, hi = lo_t.double().numpy(), hi_t.double().numpy()
        mu = x.sum(1).double().numpy() / n
        sd = np.sqrt(np.maximum(np.square(torch.linalg.vector_norm(x, dim=1).double().numpy()) / n - mu * mu, 0))
        sd = np.maximum(np.where(sd > 1e-3 * np.abs(mu), sd, 0.25 * (hi - lo)), 1e-300)  # cancellation
        if isinstance(k, Tensor):
            z = torch.special.ndtri(torch.from_numpy(np.clip(1.0 - kv / n, 1e-6, 1 - 1e-6))).numpy()
        else:
            z = statistics.NormalDist().inv_cdf(min(max(1.0 - k / n, 1e-6), 1 - 1e-6))
        edge = (hi - lo) / (4 * n)
        t = np.clip(mu + sd * z, lo + edge, hi - edge)[None, :]  # probes (p, m), float64

        # [2] search over the rows of ``xa``: x itself, later a compacted copy of the rows still searching
        # (rows that finished but were not compacted away keep being probed: that keeps them finished)
        ids = np.arange(b)  # batch row of each state row
        ca = np.nextafter(lo.astype(npdt), npdt(-np.inf)).astype(np.float64)  # every item is above a
        cc = np.nextafter(hi.astype(npdt), npdt(np.inf)).astype(np.float64)  # no item is above c
        fa, fc, kr = n - kv, -kv, kv
        stall = np.zeros(b)  # consecutive steps that crossed no item (ties: none ever will)
        final = np.empty((4, b))  # a, c, fa, fc per batch row; fa NaN: direct path
        xa, compact = x, False
        for step in range(_MAX_SEARCH_STEPS):
            p, m = t.shape
            tq = t.astype(npdt)
            f = _count(xa, tq, work[: size - m * n] if compact else work[:size]) - kr
            t = tq.astype(np.float64)
            items = fa - fc
            # a = the highest probe with f >= 0, c = the lowest with f <= -1: x_(k) lies in (a, c]
            up = f >= 0
            ca = np.maximum(ca, np.where(up, t, -np.inf).max(0))
            fa = np.minimum(fa, np.where(up, f, np.inf).min(0))
            cc = np.minimum(cc, np.where(up, np.inf, t).min(0))
            fc = np.maximum(fc, np.where(up, -np.inf, f).max(0))
            mi = fa - fc  # items in (a, c]
            stall = np.where(mi == items, stall + 1, 0)
            done = fc >= 2 - _ENUM_MAX  # x_(k), x_(k+1) and one more are the 2 - fc items nearest below c
            fin = done | (stall >= _MAX_STALL)
            if step >= _MAX_STALL:  # no float left strictly inside (a, c)
                mid = (0.5 * ca + 0.5 * cc).astype(npdt)
                fin |= ~((mid > ca) & (mid < cc))
            n_fin = int(np.count_nonzero(fin))
            if n_fin == m or step + 1 == _MAX_SEARCH_STEPS or (step >= 2 and m - n_fin <= _DIRECT_ROWS):
                # (a step for the last few rows costs more in bookkeeping than ``_pair_direct`` on them)
                final[:, ids] = np.stack([ca, cc, np.where(done, fa, np.nan), fc])
                break
            if step == 0:  # a grid around the Newton step on the Gaussian density (dcount/dt = -n pdf),
                # _FIRST_SPACING expected item gaps apart
                f0 = f[0]
                gap = (sd * (_SQRT_2PI / n)) * np.exp(np.minimum(0.5 * np.square((t[0] - mu) / sd), 700.0))
                t = np.clip(t + f0 * gap + (_FIRST_SPACING * gap) * _offsets(_PROBES), ca, cc)
                continue
            if m - n_fin <= _COMPACT_FRACTION * m:  # copy the rows still searching to the end of the buffer
                g = ids[fin]
                final[:, g] = np.stack([ca[fin], cc[fin], np.where(done[fin], fa[fin], np.nan), fc[fin]])
                live = ~fin
                ids, ca, cc, fa, fc, kr = (v[live] for v in (ids, ca, cc, fa, fc, kr))
                stall, items, mi = stall[live], items[live], mi[live]
                m -= n_fin
                xa = torch.index_select(x, 0, torch.from_numpy(ids), out=work[size - m * n: size].view(m, n))
                compact = True
            # next probes: a grid _SPACING items apart (fewer when the bracket holds few) around the regula
            # falsi point of f = 0; rows whose last step did not halve the items in their bracket (many
            # items) get an even grid in float-bit order over (a, c) instead
            p = _PROBES
            width = cc - ca
            t = ca + width * (fa / mi) + (width * np.minimum(_SPACING, mi / (p + 1)) / mi) * _offsets(p)
            slow = np.flatnonzero((mi > 0.5 * items) & (mi > 2 * p + 2))
            if slow.size:
                t[:, slow] = _key_grid(ca[slow], cc[slow], p, npdt)
    finally:
        np.seterr(**np_err)
    return _read_pair(x, k, kv, final, work, theta)


_SQRT_2PI = math.sqrt(2 * math.pi)


def _count(x: Tensor, t: np.ndarray, buf: Tensor) -> np.ndarray:
    """count_i(x_ri > t_jr) for x (m, n) and probes t (p, m) -> (p, m): one (p, rows, n) ``gt`` and a sum
    per chunk of rows that fits in ``buf``."""
    m, n = x.shape
    p = t.shape[0]
    if p > 1 and buf.numel() < p * n:  # not one row with all its probes: one probe at a time
        return np.concatenate([_count(x, t[j: j + 1], buf) for j in range(p)])
    rows = min(m, buf.numel() // (p * n))
    tt = torch.from_numpy(t).unsqueeze(2)
    if rows == m:
        cnt = buf[: p * m * n].view(p, m, n)
        torch.gt(x, tt, out=cnt)
        return cnt.sum(2).numpy()
    out = np.empty((p, m), t.dtype)
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        cnt = buf[: p * (r1 - r0) * n].view(p, r1 - r0, n)
        torch.gt(x[r0:r1], tt[:, r0:r1], out=cnt)
        out[:, r0:r1] = cnt.sum(2).numpy()
    return out


def _offsets(p: int) -> np.ndarray:
    """(p, 1) offsets of a centred grid of p probes, one unit apart."""
    return (np.arange(p) - 0.5 * (p - 1))[:, None]


def _key_grid(a: np.ndarray, c: np.ndarray, p: int, npdt: type) -> np.ndarray:
    """p points per row spread evenly between a and c in the order of float bit patterns (p, B).

    Float values map monotonically to integers (the bits for x >= 0, minus the magnitude bits for x < 0);
    an even split there is a bisection over the floats between a and c whatever their magnitudes.
    """
    ity = np.int32 if npdt == np.float32 else np.int64

    def key(v):
        bits = v.astype(npdt).view(ity).astype(np.int64)
        return np.where(bits >= 0, bits, -(bits & np.iinfo(ity).max)).astype(np.float64)

    ka, kc = key(a), key(c)
    kt = np.rint(ka + (kc - ka) * (np.arange(1, p + 1) / (p + 1))[:, None]).astype(np.int64)
    bits = np.where(kt >= 0, kt, (-kt) | np.int64(np.iinfo(ity).min)).astype(ity)
    return bits.view(npdt).astype(np.float64)


def _read_pair(x: Tensor, k: int | Tensor, kv: np.ndarray, final: np.ndarray, work: Tensor, theta: bool):
    """The exact pair from the upper probes of :func:`_pair_search`; rows it cannot certify go to ``_pair_direct``.

    Per row, count(x > c) = k + fc with fc <= -1, so x_(k) and x_(k+1) are the (-fc)-th and (1-fc)-th items
    nearest below c. :func:`_nearest_below` enumerates the J = 2 - fc nearest (one more than needed) by
    repeated ``amin`` of r = 1 / (x - c'), c' just above c, with the column index in the low mantissa bits
    of r. Certificate, exact: those bits can reorder only items whose r agree above them, so if the
    (1-fc)-th pick's r, with the index bits cleared, is strictly below the J-th's, the first 1 - fc picks
    are exactly the 1 - fc items nearest below c; they are then ordered by value. Rows whose search gave up
    (fa NaN: ties, stalls) or that fail the certificate (ties at x_(k+1)) are redone by ``_pair_direct``.
    """
    b, n = x.shape
    npdt = np.float32 if x.dtype == torch.float32 else np.float64
    _, c, fa, fc = final
    good = ~np.isnan(fa)
    need = np.where(good, 1 - fc, 1).astype(np.int64)  # picks that hold x_(k) and x_(k+1)
    yk, yk1 = np.zeros(b, npdt), np.zeros(b, npdt)
    ik, ik1 = np.zeros(b, np.int64), np.zeros(b, np.int64)
    if good.any():
        ar = np.arange(b)
        idx, key = _nearest_below(x, np.nextafter(c.astype(npdt), npdt(np.inf)), need + 1, work)
        good &= key[need - 1, ar] < key[need, ar]  # the first `need` picks are the `need` nearest
        vals = x.numpy()[ar, idx[:-1]]  # (J - 1, b); picks past a row's need are junk, never read
        live = np.arange(vals.shape[0])[:, None] < need
        order = np.argsort(np.where(live, -vals.astype(np.float64), np.inf), axis=0, kind="stable")
        top = order[need - 1, ar]  # x_(k+1): the smallest of the picks
        nxt = order[np.maximum(need - 2, 0), ar]  # x_(k): the second smallest
        ik, ik1 = idx[nxt, ar], idx[top, ar]
        yk, yk1 = vals[nxt, ar], vals[top, ar]
    bad = np.flatnonzero(~good)
    if bad.size:
        rb = torch.from_numpy(bad)
        kb = k.index_select(0, rb) if isinstance(k, Tensor) else k
        v1, j1, v2, j2 = _pair_direct(x.index_select(0, rb), kb)
        yk[bad], ik[bad], yk1[bad], ik1[bad] = v1.numpy(), j1.numpy(), v2.numpy(), j2.numpy()
    if theta:
        return torch.from_numpy((yk + yk1) * yk.dtype.type(0.5)), torch.from_numpy(np.stack([ik, ik1], 1)), None
    return torch.from_numpy(yk), torch.from_numpy(ik), torch.from_numpy(yk1), torch.from_numpy(ik1)


def _nearest_below(x: Tensor, t: np.ndarray, count: np.ndarray, work: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The ``count[i]`` items nearest below ``t[i]`` in each row i of ``x`` (B, n), nearest first, as
    candidates: indices (J, B) and order keys (J, B), J = max(count), exact up to the index bits (below);
    entries past a row's count are unspecified.

    r = 1 / (x - t) is most negative at the item nearest below t. Index reductions are several times slower
    than ``amin`` on CPU, so the column index is written into the low mantissa bits of r and read back
    from the ``amin`` value; each pick is then set to +inf so that the next ``amin`` finds the next item.
    The key of a pick is its r with the index bits cleared: exact, monotone in r, and blind only to the
    index bits, so a strictly smaller key means a truly nearer item. Rows that need more picks are copied
    together (into the other half of ``work``, 2 B n elements) once they are at most half of those still picking.
    """
    b, n = x.shape
    r = work[: b * n].view(b, n)
    npdt = np.float32 if x.dtype == torch.float32 else np.float64
    ndt = np.int32 if npdt == np.float32 else np.int64
    torch.sub(x, torch.from_numpy(t.astype(npdt)).unsqueeze(1), out=r).reciprocal_()
    idt = torch.int32 if x.dtype == torch.float32 else torch.int64
    bits = max(n - 1, 1).bit_length()
    r.view(idt).bitwise_and_(-(1 << bits)).bitwise_or_(_column_codes(n, idt))
    mask = (1 << bits) - 1
    total = int(count.max())
    idx = np.zeros((total, b), np.int64)
    key = np.zeros((total, b), npdt)
    rows = np.arange(b)  # batch row of each row of r
    for j in range(total):
        v = r.amin(1).numpy().view(ndt)
        idx[j, rows] = np.minimum(v & mask, n - 1)
        key[j, rows] = (v & ~mask).view(npdt)
        if j + 1 == total:
            break
        more = count[rows] > j + 1
        if np.count_nonzero(more) <= rows.size // 2:  # copy the rows that need more picks together
            keep = np.flatnonzero(more)
            half = b * n if r.data_ptr() == work.data_ptr() else 0  # the half of ``work`` r is not in
            r = torch.index_select(r, 0, torch.from_numpy(keep), out=work[half: half + keep.size * n].view(-1, n))
            rows = rows[keep]
        base = torch.arange(0, rows.size * n, n)
        r.view(-1).index_fill_(0, base + torch.from_numpy(idx[j, rows]), math.inf)
    return idx, key


_CODES: dict = {}


def _column_codes(n: int, dtype: torch.dtype) -> Tensor:
    key = (n, dtype)
    codes = _CODES.get(key)
    if codes is None:
        codes = _CODES[key] = torch.arange(n, dtype=dtype)
    return codes


_SCRATCH = threading.local()
_SCRATCH_MAX_BYTES = 96 << 20


def _scratch(numel: int, dtype: torch.dtype) -> Tensor:
    """A flat CPU buffer of at least ``numel`` elements, reused between calls (one per thread and dtype,
    kept only up to ``_SCRATCH_MAX_BYTES``). A fresh multi-megabyte buffer can be page-faulted in on
    every call once the allocator has handed it back to the OS; that cost more than the passes."""
    cache = getattr(_SCRATCH, "bufs", None)
    if cache is None:
        cache = _SCRATCH.bufs = {}
    buf = cache.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype)
        if numel * buf.element_size() <= _SCRATCH_MAX_BYTES:
            cache[dtype] = buf
    return buf
