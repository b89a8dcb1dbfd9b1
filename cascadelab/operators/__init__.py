"""Differentiable top-k and soft-sort operators (pure torch, batched over leading dims, last dim = items).

Top-k masks ``(..., n) -> (..., n)``: :func:`dftopk` / :func:`dftopk_logits`, :func:`lapsum_topk`,
:func:`sparse_topk`, and :func:`hard_topk_mask` for evaluation. Soft permutations ``(..., n) -> (..., n, n)``
with rows = descending positions: :func:`neural_sort`, :func:`soft_sort`, :func:`diff_sort`.
:func:`get_operator` maps user-typed names to an :class:`OperatorSpec`; hyperparameter defaults live in the
operator signatures (:func:`operator_default`).
"""

from cascadelab.operators.dftopk import INVALID_LOGIT, SATURATION_MARGIN, dftopk, dftopk_logits
from cascadelab.operators.diffsort import diff_sort
from cascadelab.operators.hard import hard_topk_mask
from cascadelab.operators.lapsum import lapsum_topk
from cascadelab.operators.permutation import neural_sort, soft_sort
from cascadelab.operators.registry import OPERATORS, OperatorSpec, available_operators, get_operator, operator_default
from cascadelab.operators.sparse_topk import sparse_topk

__all__ = [
    "INVALID_LOGIT",
    "OPERATORS",
    "SATURATION_MARGIN",
    "OperatorSpec",
    "available_operators",
    "dftopk",
    "dftopk_logits",
    "diff_sort",
    "get_operator",
    "hard_topk_mask",
    "lapsum_topk",
    "neural_sort",
    "operator_default",
    "soft_sort",
    "sparse_topk",
]
