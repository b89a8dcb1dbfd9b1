"""Cascade objectives by the names users type in ``objective.name``."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from cascadelab.cascade.objectives.arf import ARFObjective, ARFv2Objective
from cascadelab.cascade.objectives.base import ObjectiveOutput
from cascadelab.cascade.objectives.bce import BCEObjective
from cascadelab.cascade.objectives.dftopk import DFTopKObjective
from cascadelab.cascade.objectives.fs_lambdaloss import FSLambdaLossObjective
from cascadelab.cascade.objectives.fs_ranknet import FSRankNetObjective
from cascadelab.cascade.objectives.icc import ICCObjective
from cascadelab.cascade.objectives.lapsum import LapSumObjective
from cascadelab.cascade.objectives.lcron import (
    LCRONDiffSortObjective,
    LCRONNeuralSortObjective,
    LCRONObjective,
    LCRONSoftSortObjective,
)
from cascadelab.cascade.objectives.rankflow import RankFlowObjective
from cascadelab.cascade.objectives.sparse_topk import SparseTopKObjective

OBJECTIVES: dict[str, type[nn.Module]] = {
    "bce": BCEObjective,
    "icc": ICCObjective,
    "rankflow": RankFlowObjective,
    "fs-ranknet": FSRankNetObjective,
    "fs-lambdaloss": FSLambdaLossObjective,
    "arf": ARFObjective,
    "arf-v2": ARFv2Objective,
    "lcron": LCRONObjective,
    "lcron-neuralsort": LCRONNeuralSortObjective,
    "lcron-softsort": LCRONSoftSortObjective,
    "lcron-diffsort": LCRONDiffSortObjective,
    "dftopk": DFTopKObjective,
    "lapsum": LapSumObjective,
    "sparse-topk": SparseTopKObjective,
}


def build_objective(name: str, num_stages: int, params: dict[str, Any], ks: list[int] | None = None) -> nn.Module:
    """Instantiate objective ``name`` for a ``num_stages`` cascade; ``forward(scores, batch) -> ObjectiveOutput``.

    ``params`` is the objective section of the config; each objective takes the fields it declares
    (constructor keywords = config field names). ``ks`` (the stages' cut-offs) goes to the objectives
    that declare a ``ks`` argument; without it they use the RecFlow cascades' cut-offs.
    """
    if name not in OBJECTIVES:
        raise ValueError(f"objective '{name}' is unknown; valid: {', '.join(sorted(OBJECTIVES))}")
    cls = OBJECTIVES[name]
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in params.items() if k in accepted and k not in ("num_stages", "ks")}
    if "ks" in accepted and ks is not None:
        kwargs["ks"] = list(ks)
    return cls(num_stages=num_stages, **kwargs)


__all__ = ["OBJECTIVES", "ObjectiveOutput", "build_objective"]
