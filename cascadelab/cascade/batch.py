"""The tensors one training step sees: a request's user features, behaviour sequence and candidates.

Candidates of all groups are concatenated in group order (group 0 holds the ground truth), so slot ``j``
belongs to group ``j // slots_per_group``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

# The feature fields, in their order along the last axis of the id tensors; the one definition, which the
# Parquet schema (cascadelab.platform.data.schema) stores in the same order. Ids are shifted: 0 = padding.
USER_FIELDS = ("user_id", "device_id", "age", "gender", "province", "req_weekday", "req_hour", "req_minute")
SEQ_FIELDS = ("video_id", "author_id", "category_level_two", "category_level_one", "upload_type")
ITEM_FIELDS = SEQ_FIELDS + ("upload_weekday", "upload_hour", "upload_minute")
# Fixed-size time vocabularies (values shifted by one, 0 = padding).
TIME_VOCAB = {"req_weekday": 7, "req_hour": 24, "req_minute": 60,
              "upload_weekday": 7, "upload_hour": 24, "upload_minute": 60}


@dataclass
class CascadeBatch:
    """One batch of requests. B = requests, n = candidates (groups x slots), ids are 0 = padding.

    user: ``[B, 8]`` int64 USER_FIELDS; seq: ``[B, L, 5]`` int64 SEQ_FIELDS; seq_mask: ``[B, L]`` bool;
    items: ``[B, n, 8]`` int64 ITEM_FIELDS; mask: ``[B, n]`` bool (valid candidate);
    label: ``[B, n]`` float graded label, higher = better, 0 on padding; slots_per_group: int.
    """

    user: Tensor
    seq: Tensor
    seq_mask: Tensor
    items: Tensor
    mask: Tensor
    label: Tensor
    slots_per_group: int = 10

    @property
    def size(self) -> int:
        return self.user.shape[0]

    @property
    def n(self) -> int:
        return self.items.shape[1]

    def group_index(self) -> Tensor:
        """``[n]`` int64: the candidate group of every slot."""
        return torch.arange(self.n, device=self.items.device) // self.slots_per_group

    def ground_truth(self) -> Tensor:
        """``[B, n]`` bool: the valid candidates of group 0 (rank_pos / rerank_pos).

        Deviation from the LCRON reference data loader (kwai/LCRON ``dataset2.py``), which gives padded
        group-0 slots the top label 30: padded slots are never ground truth.
        """
        return self.mask & (self.group_index() == 0)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CascadeBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for key, value in moved.items():
            if isinstance(value, Tensor):
                moved[key] = value.to(device, non_blocking=non_blocking)
        return CascadeBatch(**moved)

    @classmethod
    def from_dict(cls, d: dict[str, Tensor]) -> CascadeBatch:
        return cls(user=d["user"], seq=d["seq"], seq_mask=d["seq_mask"], items=d["items"], mask=d["mask"],
                   label=d["label"], slots_per_group=int(d.get("slots_per_group", 10)))
