"""Soft-permutation helpers shared by the sorting-based objectives (ARF, ARF-v2, LCRON).

Orientation everywhere: ``P[b, k, i]`` = probability that item ``i`` sits at position ``k`` of the
descending order (rows = positions, columns = items, rows sum to 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from cascadelab.cascade.objectives.base import fill_invalid, valid_positions
from cascadelab.operators import diff_sort, neural_sort, operator_default, soft_sort

SORTS = ("neuralsort", "softsort", "diffsort")


def soft_permutation(scores: Tensor, mask: Tensor, sort: str, tau: float,
                     steepness: float = operator_default("diffsort", "steepness"), network: str = "odd_even") -> Tensor:
    """``[B, n, n]`` soft permutation of ``scores: [B, n]`` with invalid candidates sorted last.

    ``sort``: ``neuralsort`` / ``softsort`` (temperature ``tau``) or ``diffsort`` (``steepness``,
    sorting ``network``). Invalid candidates are filled below every valid score (no operator takes a
    mask), so the valid items occupy the first ``count`` positions.
    """
    x = fill_invalid(scores, mask)
    if sort == "neuralsort":
        return neural_sort(x, tau)
    if sort == "softsort":
        return soft_sort(x, tau)
    if sort == "diffsort":
        return diff_sort(x, steepness, network=network)
    raise ValueError(f"sort: expected one of {', '.join(SORTS)}, got '{sort}'")


def top_mass(perm: Tensor, q: int, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(top, total)``, each ``[B, n]``: item i's mass in the first ``q`` rows and in all valid rows.

    ``total[b, i] = sum_{k < count_b} P[b, k, i]``. ``top`` sums the first ``q`` rows, which are all
    valid positions when ``count_b > q`` (every loss using it gates on that). ``total - top`` is the
    mass in the valid rows from ``q`` on, with the gradient of exactly those rows.
    """
    top = perm[..., : max(q, 0), :].sum(-2)
    rows = valid_positions(mask).to(perm.dtype)
    total = torch.einsum("bk,bki->bi", rows, perm)
    return top, total


def memberships(perm: Tensor, q: int, mask: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """``(pi, beta)``: top-``q`` and bottom memberships normalised by the stop-gradient column mass.

    ``pi_i = sum_{k < q} Q[k, i] / (sg(col_i) + eps)``, ``beta_i = sum_{k >= q} Q[k, i] / (sg(col_i) + eps)``
    with ``Q`` = P restricted to valid rows and ``col_i = sum_k Q[k, i]`` (LCRON Eq. 10; NeuralSort is
    not column-stochastic).
    """
    top, total = top_mass(perm, q, mask)
    col = total.detach() + eps
    return top / col, (total - top).clamp_min(0.0) / col


def label_permutation(label: Tensor, mask: Tensor) -> Tensor:
    """``[B, n, n]`` the label-order permutation, uniform inside tie blocks, zero on invalid items.

    Item i with ``a_i`` valid items of strictly higher label and ``t_i`` valid items of equal label
    (itself included) spreads ``1 / t_i`` over positions ``a_i .. a_i + t_i - 1``. This is what the
    reference gets from NeuralSort(labels, tau = 1e-4) on the soft, unbinarised path, computed by
    counting instead of sorting.
    """
    valid = mask.unsqueeze(-2)  # [B, 1, j]
    li, lj = label.unsqueeze(-1), label.unsqueeze(-2)
    above = ((lj > li) & valid).sum(-1, keepdim=True)  # [B, i, 1]
    ties = ((lj == li) & valid).sum(-1, keepdim=True)
    k = torch.arange(label.shape[-1], device=label.device)
    band = (k >= above) & (k < above + ties) & mask.unsqueeze(-1)  # [B, i, k]
    lam = band.to(torch.get_default_dtype() if not label.is_floating_point() else label.dtype)
    return (lam / ties.clamp_min(1)).transpose(-1, -2)  # [B, k, i]
