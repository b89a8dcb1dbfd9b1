"""A cascade = stage models (retrieval first) + one objective, as one module for DDP and checkpoints."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from torch import Tensor, nn

from cascadelab.cascade.batch import CascadeBatch
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
