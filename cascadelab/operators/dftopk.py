"""DFTopK: the O(n) differentiable top-k mask of Zhu et al. (2025, arXiv 2510.11472).

    theta(x) = (x_(k) + x_(k+1)) / 2          x_(j) = j-th largest valid score of the row
    dftopk(x)_i = sigmoid((x_i - theta(x)) / tau)

The gradient reaches theta only through the two items x_(k) and x_(k+1) (weight 1/2 each), as in the
official code, which finds them with two ``torch.kthvalue`` calls. Here the two order statistics come
from one selection (no sort) and the backward is one elementwise pass, a row sum and a two-element
scatter (:class:`_DFTopKFunction`).

Selection (``_kth_pair``) has two exact strategies:

* small problems, or non-CPU devices: one ``torch.kthvalue`` for x_(k+1) plus a masked min for x_(k)
  (``torch.topk`` when k differs between rows; a second ``kthvalue`` for rows of <= 128 items). Below
  4096 elements or for rows of <= 128 items (no mask, int k) kernel launches, not elements, cost the
  time: there the logits are composed from two ``kthvalue`` calls with plain autograd (the fewest
  kernels; same math and gradient);
* large CPU problems (>= 2**18 elements, float32/float64 rows of 64 .. 2**24 items): a count search
  (``_pair_search``), no sort, no ``topk``/``kthvalue`` on the hot path. A count is one ``gt`` into a
  float buffer plus a row sum; several probes per row share one (P, rows, n) ``gt``. Per row a bracket
  (a, c] with count(x > a) > k >= count(x > c) is narrowed: first probe at the Gaussian quantile
  mu + sd Phi^-1(1 - k/n) (mu, sd from one row sum and one row norm; the row min/max come from the
  NaN/inf check of the public function), then 4 probes around the Newton step on the Gaussian density,
  1.5 expected item gaps apart, then 4 probes per step about one item apart around the regula-falsi
  point (rows whose bracket did not halve in items get an even split in float-bit order instead, safe
  for any spread of values). Rows still searching are copied together (into reused scratch memory,
  ``_scratch``) once they are at most 3/4 of the rows. A row is resolved when count(x > c) == k or the
  bracket holds exactly x_(k+1) and x_(k). The pair is then read out with r = 1 / (x - c), whose ``amax``
  is the item nearest above c and ``amin`` the nearest below; the column index is written into the low
  mantissa bits of r so that the value reductions also return the index (index reductions are ~10x
  slower on CPU). That index trick can misorder items whose r agree to ~n ulps, so every row is
  certified: exactly when a probe bracket holds the candidate alone (count k+1 below / k-1 above), else
  by counting (count(x >= x_(k)) == k and count(x > x_(k+1)) == k). Rows not resolved (ties never
  separate; the search notices a bracket that stops losing items) or not certified go to the small
  path, so the result is always the exact pair. Measured on 2 CPU threads (float32, Gaussian rows,
  forward + BCE-with-logits + backward, against the same BCE on x / tau; interleaved medians): 1024 x
  1000, about 7 search steps and ~25 full-size passes, the whole step costs 3.2x the floor (2.7x faster
  than two ``kthvalue`` calls); there the NumPy/Python bookkeeping between the passes costs about as
  much as the passes themselves. 1024 x 10,000: 1.6-1.8x the floor (the previous search: 2.2x). Scratch: 2 B n
  elements per thread and dtype, kept while <= 96 MiB (fresh multi-megabyte buffers were page-faulted
  in on every call once the allocator had handed them back).

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
_MAX_STALL = 4  # a row whose probes cross no item this many steps in a row takes the direct path
_PROBES = 4  # probes per row and step after the first
_FIRST_SPACING = 1.5  # the second step's probes, in expected item gaps
_COMPACT_FRACTION = 0.75  # rows still searching are copied together once they are at most this part
_CHECK_ALL = 0.5  # certificate counts run on all rows above this part, else on a gathered copy
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
    if (mask is not None or type(k) is not int or not isinstance(scores, Tensor)
            or scores.numel() < _ITERATIVE_MIN_ELEMENTS or scores.dim() == 0):
        return False
    n = scores.shape[-1]
    return 0 < k < n and 128 < n < 1 << 24 and scores.device.type == "cpu" and scores.dtype in _SEARCH_DTYPES


def _use_composed(scores: Tensor, k: int | Tensor, mask: Tensor | None) -> bool:
    n = scores.shape[-1]
    return mask is None and isinstance(k, int) and k < n and (scores.numel() <= _TWO_KTHVALUE_MAX or n <= 128)


def _tiny_logits(scores: Tensor, k: int, tau: float) -> Tensor:
    """Launch-bound regime (<= 4096 elements or rows <= 128 items): two kthvalue calls with plain autograd
    are the fewest kernels and beat the custom Function's fixed overhead.

    Same math and same gradient (kthvalue routes it to the selected item) as :class:`_DFTopKFunction`.
    """
    n = scores.shape[-1]
    kth = torch.kthvalue(scores, n - k + 1, dim=-1, keepdim=True).values  # k-th largest
    nxt = torch.kthvalue(scores, n - k, dim=-1, keepdim=True).values  # (k+1)-th largest
    return (scores - (kth + nxt) * 0.5) / tau


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


def _searchable(x: Tensor) -> bool:
    n = x.shape[1]
    return (x.device.type == "cpu" and x.numel() >= _ITERATIVE_MIN_ELEMENTS and 64 <= n < 1 << 24
            and x.dtype in (torch.float32, torch.float64))


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
    Per row a bracket (a, c] with fa = count(x > a) - k > 0 >= fc = count(x > c) - k, and the lowest
    probe c2 with f2 = count(x > c2) - k <= -1. A row is resolved when fc == 0 (c separates x_(k) from
    x_(k+1)) or fa == 1 and fc == -1 ((a, c] holds exactly x_(k+1) and x_(k)).
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
        # (rows that finished but were not compacted away keep being probed: that keeps them resolved)
        ids = np.arange(b)  # batch row of each state row
        ca = np.nextafter(lo.astype(npdt), npdt(-np.inf)).astype(np.float64)  # every item is above a
        cc = np.nextafter(hi.astype(npdt), npdt(np.inf)).astype(np.float64)  # no item is above c
        fa, fc, kr = n - kv, -kv, kv
        c2, f2 = cc.copy(), fc.copy()
        stall = np.zeros(b)  # consecutive steps that crossed no item (ties: none ever will)
        final = np.empty((6, b))  # a, c, fa, fc, c2, f2 per batch row; fa NaN: direct path
        xa, compact = x, False
        for step in range(_MAX_SEARCH_STEPS):
            p, m = t.shape
            tq = t.astype(npdt)
            f = _count(xa, tq, work[: size - m * n] if compact else work[:size]) - kr
            t = tq.astype(np.float64)
            items = fa - fc
            if p == 1:
                f, t = f[0], t[0]
                up = f > 0  # the probe is below the target: it becomes a, else c
                ca, fa = np.where(up, t, ca), np.where(up, f, fa)
                cc, fc = np.where(up, cc, t), np.where(up, fc, f)
                low = (f <= -1) & (t < c2)
                c2, f2 = np.where(low, t, c2), np.where(low, f, f2)
            else:  # count(x > t) falls as t grows: a = the highest probe with f > 0, c = the lowest other
                up, low = f > 0, f <= -1
                ca = np.maximum(ca, np.where(up, t, -np.inf).max(0))
                fa = np.minimum(fa, np.where(up, f, np.inf).min(0))
                cc = np.minimum(cc, np.where(up, np.inf, t).min(0))
                fc = np.maximum(fc, np.where(up, -np.inf, f).max(0))
                c2 = np.minimum(c2, np.where(low, t, np.inf).min(0))
                f2 = np.maximum(f2, np.where(low, f, -np.inf).max(0))
            mi = fa - fc
            stall = np.where(mi == items, stall + 1, 0)
            done = (fc == 0) | (mi == 2)  # (fa, fc) = (1, -1) or (2, 0)
            fin = done | (stall >= _MAX_STALL)
            if step >= _MAX_STALL:  # no float left strictly inside (a, c)
                mid = (0.5 * ca + 0.5 * cc).astype(npdt)
                fin |= ~((mid > ca) & (mid < cc))
            n_fin = int(np.count_nonzero(fin))
            if n_fin == m or step + 1 == _MAX_SEARCH_STEPS:
                final[:, ids] = np.stack([ca, cc, np.where(done, fa, np.nan), fc, c2, f2])
                break
            if step == 0:  # a grid around the Newton step on the Gaussian density (dcount/dt = -n pdf),
                # _FIRST_SPACING expected item gaps apart
                gap = (sd * (_SQRT_2PI / n)) * np.exp(np.minimum(0.5 * np.square((t - mu) / sd), 700.0))
                t = np.clip(t + f * gap + (_FIRST_SPACING * gap) * _offsets(_PROBES), ca, cc)
                continue
            if m - n_fin <= _COMPACT_FRACTION * m:  # copy the rows still searching to the end of the buffer
                g = ids[fin]
                final[:, g] = np.stack([ca[fin], cc[fin], np.where(done[fin], fa[fin], np.nan), fc[fin],
                                        c2[fin], f2[fin]])
                live = ~fin
                ids, ca, cc, fa, fc, kr, c2, f2 = (v[live] for v in (ids, ca, cc, fa, fc, kr, c2, f2))
                stall, items, mi = stall[live], items[live], mi[live]
                m -= n_fin
                xa = torch.index_select(x, 0, torch.from_numpy(ids), out=work[size - m * n: size].view(m, n))
                compact = True
            # next probes, as many per row as the work buffer holds (up to _PROBES): a grid about one item
            # apart around the regula falsi point; rows whose last step did not halve the items in their
            # bracket (many items) get an even grid in float-bit order over (a, c) instead
            p = _PROBES
            t = ca + (cc - ca) * (fa / mi) + ((cc - ca) / np.maximum(mi, p + 1)) * _offsets(p)
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
    """The exact pair from the brackets of :func:`_pair_search`; rows it cannot certify go to ``_pair_direct``.

    Candidates (:func:`_nearest`, one pass set): rows with fc == 0 take x_(k) = the item nearest above c
    and x_(k+1) = the nearest below c; rows with fa == 1, fc == -1 take the nearest below c and the
    nearest above a. Certificates, exact: a candidate inside a bracket that holds one item is that item
    (lower: fa == 1 and a < x_(k+1) <= c; upper: f2 == -1 and c < x_(k) <= c2; pair rows: two distinct
    candidates inside (a, c]). Rows left uncertified are checked by counting: count(x >= x_(k)) == k and
    count(x > x_(k+1)) == k hold iff the two are the k-th and (k+1)-th largest. Rows failing (ties, an
    item at a probe, rounding) are redone by ``_pair_direct``.
    """
    b, n = x.shape
    a, c, fa, fc, c2, f2 = final
    use_c = fc == 0
    pair = ~use_c & (fa == 1) & (fc == -1)
    rp = np.flatnonzero(pair)
    up, dn = _nearest(x, c, rp, a[rp], work)  # (b + |rp|,) candidate indices
    ik = np.where(use_c, up[:b], dn[:b])
    ik1 = dn[:b].copy()
    ik1[rp] = up[b:]
    xn = x.numpy()
    ar = np.arange(b)
    yk, yk1 = xn[ar, ik], xn[ar, ik1]
    yk64, yk164 = yk.astype(np.float64), yk1.astype(np.float64)
    lower = (fa == 1) & (yk164 > a) & (yk164 <= c)
    sure = use_c & lower & (f2 == -1) & (yk64 > c) & (yk64 <= c2)
    sure |= pair & (ik != ik1) & (yk64 > a) & (yk64 <= c) & lower
    swap = sure & pair & (yk < yk1)
    if swap.any():
        yk[swap], yk1[swap], ik[swap], ik1[swap] = yk1[swap], yk[swap], ik1[swap], ik[swap]
    ok = sure.copy()
    check = np.flatnonzero(~sure & (use_c | pair))
    if check.size:  # count-check the rest (all rows in one pass, or a gathered copy of the few)
        xs = x if check.size > _CHECK_ALL * b else torch.index_select(x, 0, torch.from_numpy(check))
        rows = ar if xs is x else check
        cnt = work[: xs.shape[0] * n].view(xs.shape[0], n)
        torch.ge(xs, torch.from_numpy(yk[rows]).unsqueeze(1), out=cnt)
        good = cnt.sum(1).numpy() == kv[rows]
        torch.gt(xs, torch.from_numpy(yk1[rows]).unsqueeze(1), out=cnt)
        good &= cnt.sum(1).numpy() == kv[rows]
        ok[rows] |= good & (use_c | pair)[rows]
    bad = np.flatnonzero(~ok)
    if bad.size:
        rb = torch.from_numpy(bad)
        kb = k.index_select(0, rb) if isinstance(k, Tensor) else k
        v1, j1, v2, j2 = _pair_direct(x.index_select(0, rb), kb)
        yk[bad], ik[bad], yk1[bad], ik1[bad] = v1.numpy(), j1.numpy(), v2.numpy(), j2.numpy()
    if theta:
        return torch.from_numpy((yk + yk1) * yk.dtype.type(0.5)), torch.from_numpy(np.stack([ik, ik1], 1)), None
    return torch.from_numpy(yk), torch.from_numpy(ik), torch.from_numpy(yk1), torch.from_numpy(ik1)


def _nearest(x: Tensor, t: np.ndarray, rows: np.ndarray, t2: np.ndarray, work: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Candidate indices of the items nearest above and nearest below ``t`` in each row of ``x`` (B, n),
    followed by the same for rows ``rows`` of ``x`` against ``t2``: two (B + len(rows),) arrays.

    r = 1 / (x - t) is largest at the item nearest above t and smallest at the nearest below. Index
    reductions are several times slower than ``amax`` on CPU, so the column index is written into the
    low mantissa bits of r (which perturbs the order only among items whose r agree to ~n ulps) and
    read back from the ``amax`` / ``amin`` values. Candidates only: the caller certifies them.
    """
    b, n = x.shape
    m = b + rows.size
    r = work[: m * n].view(m, n)
    npdt = np.float32 if x.dtype == torch.float32 else np.float64
    torch.sub(x, torch.from_numpy(t.astype(npdt)).unsqueeze(1), out=r[:b])
    if rows.size:
        torch.index_select(x, 0, torch.from_numpy(rows), out=r[b:])
        r[b:].sub_(torch.from_numpy(t2.astype(npdt)).unsqueeze(1))
    r.reciprocal_()
    ri = r.view(torch.int32 if x.dtype == torch.float32 else torch.int64)
    bits = max(n - 1, 1).bit_length()
    ri.bitwise_and_(-(1 << bits)).bitwise_or_(_column_codes(n, ri.dtype))
    mask = (1 << bits) - 1
    up = r.amax(1).view(ri.dtype).numpy() & mask
    dn = r.amin(1).view(ri.dtype).numpy() & mask
    return np.minimum(up, n - 1).astype(np.int64), np.minimum(dn, n - 1).astype(np.int64)


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
