"""In-batch negative sampling: grow every request's candidate list with other requests' candidates.

DFTopK's ``--sample_num`` (zhangzhen97/DFTOPK ``torch/run_train2_negativesampling.py``,
``select_samples_all_batches``): for each request, ``sample_num`` extra candidates are
drawn uniformly without replacement from the candidates of the other requests of the batch, with label 0
and mask 1. Fix: only VALID candidates are drawn (the reference also drew padded slots, which became
"valid" all-zero items).
"""

from __future__ import annotations

import torch
from torch import Tensor

from cascadelab.cascade.batch import CascadeBatch

# Upper bound on the random keys materialised at once (rows x pool); the row chunks keep memory flat.
_MAX_KEYS = 1 << 24


def _draw(valid_owner: Tensor, batch_size: int, sample_num: int,
          generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """For every request b: ``sample_num`` distinct pool positions whose owner != b, uniformly.

    ``valid_owner: [V]`` the request of each pool entry, sorted ascending. Returns ``(index [B, s],
    ok [B, s])``; ``ok`` is False where request b has fewer than ``sample_num`` foreign candidates.
    Uniform without replacement = the ``sample_num`` largest of i.i.d. uniform keys over the allowed set.
    """
    pool = valid_owner.shape[0]
    take = min(sample_num, pool)
    idx_parts, ok_parts = [], []
    rows_per_chunk = max(1, _MAX_KEYS // max(pool, 1))
    for start in range(0, batch_size, rows_per_chunk):
        rows = torch.arange(start, min(start + rows_per_chunk, batch_size), device=valid_owner.device)
        keys = torch.rand(rows.shape[0], pool, generator=generator, device=valid_owner.device)
        keys.masked_fill_(valid_owner.unsqueeze(0) == rows.unsqueeze(1), -1.0)  # own candidates never win
        top = keys.topk(take, dim=-1)
        idx_parts.append(top.indices)
        ok_parts.append(top.values >= 0)
    index = torch.cat(idx_parts) if idx_parts else valid_owner.new_zeros(batch_size, take)
    ok = torch.cat(ok_parts) if ok_parts else torch.zeros(batch_size, take, dtype=torch.bool)
    if take < sample_num:  # the whole batch holds fewer valid candidates than requested
        pad = sample_num - take
        index = torch.cat([index, index.new_zeros(batch_size, pad)], dim=1)
        ok = torch.cat([ok, ok.new_zeros(batch_size, pad)], dim=1)
    return index, ok


def sample_in_batch_negatives(batch: CascadeBatch, sample_num: int,
                              generator: torch.Generator | None = None) -> CascadeBatch:
    """``batch`` with ``sample_num`` extra candidate slots per request, appended after the existing groups.

    Every extra slot holds a valid candidate of another request of the batch (uniformly, without
    replacement; never one of the request's own candidates, never padding), with label 0 and mask 1;
    the extra slots are not ground truth (they fall in the groups after group 0). If a request cannot get
    ``sample_num`` foreign candidates (tiny batches), the remaining slots are padding (mask 0, ids 0).
    Vectorised: one random-key top-k over the batch's valid candidates (chunked over rows for memory).
    ``generator`` must live on the batch's device (CPU by default).
    """
    if sample_num < 0:
        raise ValueError(f"sample_num: expected >= 0, got {sample_num}")
    if sample_num == 0:
        return batch
    b, n = batch.mask.shape
    flat = batch.mask.reshape(-1).nonzero().squeeze(-1)  # [V] flat slots of valid candidates, ascending
    owner = torch.div(flat, n, rounding_mode="floor")
    index, ok = _draw(owner, b, sample_num, generator)
    slots = flat[index] if flat.numel() else index  # [B, s] flat candidate slot (all not ok if no pool)
    items = batch.items.reshape(b * n, -1)[slots]  # [B, s, F]
    items = torch.where(ok.unsqueeze(-1), items, torch.zeros_like(items))
    label = batch.label.new_zeros(b, sample_num)
    return CascadeBatch(user=batch.user, seq=batch.seq, seq_mask=batch.seq_mask,
                        items=torch.cat([batch.items, items], dim=1),
                        mask=torch.cat([batch.mask, ok], dim=1),
                        label=torch.cat([batch.label, label], dim=1),
                        slots_per_group=batch.slots_per_group)
