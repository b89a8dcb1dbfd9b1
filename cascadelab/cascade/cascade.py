"""A cascade = stage models (retrieval first) + one objective, as one module for DDP and checkpoints."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from torch import Tensor, nn

from cascadelab.cascade.batch import CascadeBatch
from cascadelab.cascade.metrics import stage_names
from cascadelab.cascade.models import build_model
from cascadelab.cascade.objectives import ObjectiveOutput, build_objective


class Cascade(nn.Module):
    """``forward(batch) -> (scores, ObjectiveOutput)``; ``scores[s]: [B, n]`` logits of stage ``s``."""

    def __init__(self, stage_models: list[str], ks: list[int], vocab: dict[str, int], objective: str,
                 objective_params: dict, emb_dim: int = 8, hidden: int = 128):
        super().__init__()
        self.ks = list(ks)
        self.stages = nn.ModuleList([build_model(m, vocab, emb_dim, hidden) for m in stage_models])
        self.objective = build_objective(objective, len(stage_models), objective_params, ks=self.ks)

    def scores(self, batch: CascadeBatch) -> list[Tensor]:
        return [stage(batch) for stage in self.stages]

    def forward(self, batch: CascadeBatch) -> tuple[list[Tensor], ObjectiveOutput]:
        scores = self.scores(batch)
        return scores, self.objective(scores, batch)


class Stage(Protocol):
    """One stage of a stage list: its model's name and how many candidates it passes on."""

    model: str
    k: int


def build_cascade(stages: Sequence[Stage], vocab: dict[str, int], objective: str,
                  objective_params: Mapping[str, Any], emb_dim: int = 8, hidden: int = 128) -> Cascade:
    """The cascade of a stage list (retrieval first), trained with ``objective``.

    ``vocab``: real ids per field (tables get ``vocab + 1`` rows); ``objective_params``: every objective
    hyperparameter by name (each objective takes the ones its constructor names).
    """
    return Cascade([s.model for s in stages], [s.k for s in stages], vocab, objective, dict(objective_params),
                   emb_dim=emb_dim, hidden=hidden)


#: The tensors of a batch a :class:`CascadeScorer` reads (the flat dict of ``CascadeBatch.from_dict``).
SCORER_INPUTS = ("user", "seq", "seq_mask", "items", "mask", "label")


class CascadeScorer(nn.Module):
    """A trained cascade as a model that serves: ``forward(tensors) -> {stage name: [B, n] scores}``.

    ``tensors``: the flat dict of one batch (:data:`SCORER_INPUTS`, shapes as in ``CascadeBatch``; the
    labels are read but do not change the scores). Stage names are ``cascade.metrics.stage_names``
    (``retrieval``, ..., ``ranking``); ``ks`` and the stage order travel with the module.
    """

    def __init__(self, cascade: Cascade):
        super().__init__()
        self.stages = cascade.stages
        self.ks = list(cascade.ks)
        self.names = stage_names(len(cascade.stages))

    def forward(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        batch = CascadeBatch.from_dict(tensors)
        return {name: stage(batch) for name, stage in zip(self.names, self.stages, strict=True)}
