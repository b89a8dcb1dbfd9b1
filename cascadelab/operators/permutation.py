"""Soft permutation matrices: NeuralSort (Grover et al., ICLR 2019) and SoftSort (Prillo & Eisenschlos, ICML 2020).

Both return ``P`` of shape ``(..., n, n)`` with ``P[..., r, i]`` = soft probability that item ``i`` sits
at rank position ``r`` of the DESCENDING order (row 0 = largest score). Rows are softmaxes, so they sum
to 1; columns do not in general (neither operator is doubly stochastic).

NeuralSort:  P[r, i] = softmax_i( ((n + 1 - 2(r+1)) s_i - A_i) / tau ),   A_i = sum_j |s_i - s_j|.
SoftSort:    P[r, i] = softmax_i( -|s_sorted[r] - s_i| / tau ),           s_sorted descending.

Cost O(n^2) time and memory per list (the output itself). Deviation from the LCRON/DFTopK reference
code: A is computed from one sort and prefix sums in O(n log n), not as ``|s_i - s_j| @ 1 1^T``, an
O(n^3) matmul. The reference's ``descending=False`` branch (which slices with a negative step and would
raise) is not reproduced: only the descending orientation exists here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cascadelab.operators._checks import check_positive, check_scores


def neural_sort(scores: Tensor, tau: float = 50.0) -> Tensor:
    """NeuralSort relaxed permutation matrix, ``(..., n)`` -> ``(..., n, n)`` (row = descending position).

    Args:
        scores: ``(..., n)`` floating tensor.
        tau: temperature > 0 (LCRON uses 50 on raw logits); tau -> 0 gives the hard permutation.

    Raises:
        ValueError: naming the argument, for bad scores or tau.
    """
    check_scores(scores, "scores")
    tau = check_positive(tau, "tau")
    n = scores.shape[-1]
    a = _abs_deviation_sums(scores)  # (..., n): A_i
    coef = n + 1 - 2 * torch.arange(1, n + 1, device=scores.device, dtype=scores.dtype)  # (n,)
    logits = torch.addcmul(-a.unsqueeze(-2), coef.unsqueeze(-1), scores.unsqueeze(-2))  # (..., n, n)
    return torch.softmax(logits / tau, dim=-1)


def soft_sort(scores: Tensor, tau: float = 50.0) -> Tensor:
    """SoftSort relaxed permutation matrix, ``(..., n)`` -> ``(..., n, n)`` (row = descending position).

    The sorted values are differentiable (a gather through the sort), as in the paper.

    Args:
        scores: ``(..., n)`` floating tensor.
        tau: temperature > 0 (LCRON's default 50 on raw logits).

    Raises:
        ValueError: naming the argument, for bad scores or tau.
    """
    check_scores(scores, "scores")
    tau = check_positive(tau, "tau")
    s_sorted = torch.sort(scores, dim=-1, descending=True).values
    dist = (s_sorted.unsqueeze(-1) - scores.unsqueeze(-2)).abs()  # (..., n, n): |s_sorted[r] - s_i|
    return torch.softmax(dist / -tau, dim=-1)


def _abs_deviation_sums(s: Tensor) -> Tensor:
    """A_i = sum_j |s_i - s_j| along the last dim, in O(n log n) via a sort and prefix sums."""
    n = s.shape[-1]
    u, order = torch.sort(s, dim=-1)  # ascending
    pos = torch.arange(n, device=s.device, dtype=s.dtype)  # items below u_p: p, above: n - 1 - p
    before = torch.cumsum(u, dim=-1) - u  # sum_{q<p} u_q
    after = u.sum(-1, keepdim=True) - before - u  # sum_{q>p} u_q
    a_sorted = pos * u - before + after - (n - 1 - pos) * u
    return torch.empty_like(a_sorted).scatter_(-1, order, a_sorted)
