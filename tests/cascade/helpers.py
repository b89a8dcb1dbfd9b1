"""Small synthetic CascadeBatch builders for unit tests (no Ray, no Parquet)."""

from __future__ import annotations

import torch

from cascadelab.cascade.batch import CascadeBatch

VOCAB = {"user_id": 50, "device_id": 40, "age": 8, "gender": 3, "province": 34, "video_id": 300,
         "author_id": 60, "category_level_two": 20, "category_level_one": 5, "upload_type": 4}
ITEM_HIGH = [300, 60, 20, 5, 4, 7, 24, 60]
USER_HIGH = [50, 40, 8, 3, 34, 7, 24, 60]


def random_batch(b: int = 6, groups: int = 4, seq_len: int = 50, seed: int = 0,
                 pad_prob: float = 0.2) -> CascadeBatch:
    g = torch.Generator().manual_seed(seed)
    n = groups * 10
    user = torch.stack([torch.randint(1, h + 1, (b,), generator=g) for h in USER_HIGH], dim=1)
    items = torch.stack([torch.randint(1, h + 1, (b, n), generator=g) for h in ITEM_HIGH], dim=-1)
    seq = items.new_zeros(b, seq_len, 5)
    seq[:] = torch.stack([torch.randint(1, h + 1, (b, seq_len), generator=g) for h in ITEM_HIGH[:5]], -1)
    seq_mask = torch.rand(b, seq_len, generator=g) > 0.3
    mask = torch.rand(b, n, generator=g) > pad_prob
    mask[:, 0] = True
    grade = torch.tensor([29.0 - i for i in range(10)] + [7.0] * 10 + [6.0] * 10 + [5.0] * 10
                         + [4.0] * 10 * max(groups - 4, 0))[:n]
    label = grade.expand(b, n) * mask
    items = items * mask.unsqueeze(-1)
    return CascadeBatch(user=user, seq=seq * seq_mask.unsqueeze(-1), seq_mask=seq_mask, items=items,
                        mask=mask, label=label)
