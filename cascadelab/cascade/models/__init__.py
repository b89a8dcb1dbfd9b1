"""Stage models by the names used in configs: ``dssm`` (retrieval), ``din`` (ranking), ``mlp`` (pre-ranking)."""

from __future__ import annotations

from torch import nn

from cascadelab.cascade.models.din import DIN
from cascadelab.cascade.models.dssm import DSSM
from cascadelab.cascade.models.mlp import MLP

MODELS: dict[str, type[nn.Module]] = {"dssm": DSSM, "din": DIN, "mlp": MLP}


def build_model(name: str, vocab: dict[str, int], emb_dim: int = 8, hidden: int = 128) -> nn.Module:
    """A stage model sized from the dataset's vocabulary; ``forward(batch) -> [B, n]`` logits."""
    if name not in MODELS:
        raise ValueError(f"model '{name}' is unknown; valid: {', '.join(sorted(MODELS))}")
    return MODELS[name](vocab, emb_dim=emb_dim, hidden=hidden)


__all__ = ["DIN", "DSSM", "MLP", "MODELS", "build_model"]
