"""Tiny hand-built CascadeBatch for hand-computed objective values."""

from __future__ import annotations

import torch

from cascadelab.cascade.batch import CascadeBatch


def toy_batch(mask: list[list[bool]], label: list[list[float]], slots: int = 2) -> CascadeBatch:
    m = torch.tensor(mask)
    b, n = m.shape
    return CascadeBatch(user=torch.ones(b, 8, dtype=torch.long), seq=torch.ones(b, 3, 5, dtype=torch.long),
                        seq_mask=torch.ones(b, 3, dtype=torch.bool), items=torch.ones(b, n, 8, dtype=torch.long),
                        mask=m, label=torch.tensor(label, dtype=torch.float64) * m, slots_per_group=slots)


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)
