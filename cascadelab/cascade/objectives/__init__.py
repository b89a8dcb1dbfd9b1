"""Cascade objectives by the names users type in ``objective.name``."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from cascadelab.cascade.objectives.base import ObjectiveOutput
from cascadelab.cascade.objectives.bce import BCEObjective
from cascadelab.cascade.objectives.dftopk import DFTopKObjective

OBJECTIVES: dict[str, type[nn.Module]] = {"bce": BCEObjective, "dftopk": DFTopKObjective}


def build_objective(name: str, num_stages: int, params: dict[str, Any]) -> nn.Module:
    """Instantiate objective ``name`` for a ``num_stages`` cascade; ``forward(scores, batch) -> ObjectiveOutput``.

    ``params`` is the objective section of the config; each objective takes the fields it declares.
    """
    if name not in OBJECTIVES:
        raise ValueError(f"objective '{name}' is unknown; valid: {', '.join(sorted(OBJECTIVES))}")
    cls = OBJECTIVES[name]
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in params.items() if k in accepted and k != "num_stages"}
    return cls(num_stages=num_stages, **kwargs)


__all__ = ["OBJECTIVES", "ObjectiveOutput", "build_objective"]
