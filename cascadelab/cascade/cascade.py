"""A cascade = stage models (retrieval first) + one objective, as one module for DDP and checkpoints."""

from __future__ import annotations

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
