"""Registry from user-typed operator names to their functions and default hyperparameters.

    spec = get_operator("dftopk")
    soft = spec(scores, k=10)               # defaults from spec.hyperparams
    soft = spec(scores, k=10, tau=100.0)    # override by name

Hyperparameter defaults live in the operator signatures only; :func:`operator_default` reads them
(``operator_default("dftopk", "tau")`` = 500.0) for the objectives and benchmarks that need a value.
``kind == "topk"`` operators are called ``fn(scores, k, **hyperparams)`` and return a ``(..., n)`` mask;
``kind == "permutation"`` operators are called ``fn(scores, **hyperparams)`` and return ``(..., n, n)``
with rows = descending positions.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from torch import Tensor

from cascadelab.operators.dftopk import dftopk
from cascadelab.operators.diffsort import diff_sort
from cascadelab.operators.lapsum import lapsum_topk
from cascadelab.operators.permutation import neural_sort, soft_sort
from cascadelab.operators.sparse_topk import sparse_topk


@dataclass(frozen=True)
class OperatorSpec:
    """One registered operator: its public name, function, kind and hyperparameter defaults."""

    name: str
    fn: Callable[..., Tensor]
    kind: Literal["topk", "permutation"]
    hyperparams: Mapping[str, float] = field(default_factory=dict)
    description: str = ""

    def __call__(self, scores: Tensor, k: int | Tensor | None = None, **overrides: float) -> Tensor:
        unknown = set(overrides) - set(self.hyperparams)
        if unknown:
            raise ValueError(f"operator {self.name!r} has no hyperparameter(s) {sorted(unknown)}; "
                             f"valid: {sorted(self.hyperparams)}")
        hp = {**self.hyperparams, **overrides}
        if self.kind == "topk":
            if k is None:
                raise ValueError(f"'k' is required by the top-k operator {self.name!r}")
            return self.fn(scores, k, **hp)
        if k is not None:
            raise ValueError(f"'k' is not an argument of the permutation operator {self.name!r}")
        return self.fn(scores, **hp)


def _spec(name: str, fn: Callable[..., Tensor], kind: Literal["topk", "permutation"], description: str,
          *hyperparams: str) -> OperatorSpec:
    """An :class:`OperatorSpec` whose ``hyperparams`` are the defaults of ``fn``'s named keywords."""
    params = inspect.signature(fn).parameters
    return OperatorSpec(name, fn, kind, MappingProxyType({h: params[h].default for h in hyperparams}), description)


OPERATORS: Mapping[str, OperatorSpec] = MappingProxyType({
    s.name: s
    for s in (
        _spec("dftopk", dftopk, "topk", "DFTopK sigmoid((s - theta)/tau), O(n)", "tau"),
        _spec("lapsum", lapsum_topk, "topk", "LapSum soft top-k, rows sum to k, O(n log n)", "alpha"),
        _spec("neuralsort", neural_sort, "permutation", "NeuralSort soft permutation, O(n^2)", "tau"),
        _spec("softsort", soft_sort, "permutation", "SoftSort soft permutation, O(n^2)", "tau"),
        _spec("diffsort", diff_sort, "permutation", "odd-even sorting network, Cauchy relaxation", "steepness"),
        _spec("sparse-topk", sparse_topk, "topk", "sparse soft top-k (p=2), exact, O(n log n)", "l"),
    )
})


def operator_default(name: str, hyperparam: str) -> float:
    """The default of ``hyperparam`` in the signature of operator ``name`` (e.g. ``("dftopk", "tau")``)."""
    return get_operator(name).hyperparams[hyperparam]


def available_operators() -> list[str]:
    """The registered operator names, sorted."""
    return sorted(OPERATORS)


def get_operator(name: str) -> OperatorSpec:
    """The :class:`OperatorSpec` registered under ``name``.

    Raises:
        ValueError: naming the unknown name and listing the valid names.
    """
    try:
        return OPERATORS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown operator {name!r}; valid names: {', '.join(available_operators())}") from None
