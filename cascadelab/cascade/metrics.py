"""Cascade metrics: Joint Recall@gt@m of the whole cascade, per-stage Recall@gt@k and NDCG@10.

Conventions: ``scores[s]: [B, n]`` logits of stage ``s`` (higher = better), ``ks[s]`` how many candidates
stage ``s`` passes on, ground truth = the valid candidates of group 0 (``batch.ground_truth()``).
Functions return per-batch *sums* and *counts* so that callers can average exactly over batches and
workers (sum the sums, sum the counts, divide once).

Deviations from the reference evaluation (kwai/LCRON ``metrics.py``): padded candidates are never selected;
recall divides by the number of real ground-truth items (10 unless group 0 is padded) and skips requests
without any; NDCG gains are masked (padded slots have gain 0). Ties between equal scores are broken by
``torch.topk``; with float logits they have measure zero.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cascadelab.cascade.batch import CascadeBatch
from cascadelab.operators import hard_topk_mask


def stage_names(num_stages: int) -> list[str]:
    """``2 -> [retrieval, ranking]``, ``3 -> [retrieval, prerank, ranking]``."""
    if num_stages == 1:
        return ["ranking"]
    middle = ["prerank"] if num_stages == 3 else [f"prerank{i}" for i in range(1, num_stages - 1)]
    return ["retrieval", *middle, "ranking"]


def metric_names(num_stages: int, ndcg: bool = True) -> list[str]:
    """Evaluation metric keys of a cascade, joint first: ``joint_recall``, then per stage (in cascade order)
    ``<stage>_recall`` and, with ``ndcg``, ``<stage>_ndcg``. The keys :func:`metric_sums` produces."""
    names = ["joint_recall"]
    for stage in stage_names(num_stages):
        names += [f"{stage}_recall", f"{stage}_ndcg"] if ndcg else [f"{stage}_recall"]
    return names


def select_topk(scores: Tensor, k: int, available: Tensor) -> Tensor:
    """``[B, n]`` bool: the ``k`` highest-scoring available candidates (all of them if fewer); ties go to
    the lower slot (:func:`cascadelab.operators.hard_topk_mask`)."""
    return hard_topk_mask(scores.detach(), k, mask=available)


def cascade_selection(scores: list[Tensor], ks: list[int], mask: Tensor) -> Tensor:
    """Run the cascade: stage s keeps its top ``ks[s]`` of what stage s-1 kept. Returns ``[B, n]`` bool."""
    kept = mask
    for s, k in zip(scores, ks, strict=True):
        kept = select_topk(s, k, kept)
    return kept


def ndcg_at(scores: Tensor, gains: Tensor, mask: Tensor, k: int = 10) -> tuple[Tensor, Tensor]:
    """Per-row NDCG@k with linear gains and log2 discounts; returns (values [B], defined [B] bool)."""
    k = min(k, scores.shape[-1])
    gains = gains * mask
    order = scores.detach().masked_fill(~mask, float("-inf")).topk(k, dim=-1).indices
    discount = 1.0 / torch.log2(torch.arange(2, k + 2, device=scores.device, dtype=gains.dtype))
    dcg = (gains.gather(-1, order) * discount).sum(-1)
    idcg = (gains.topk(k, dim=-1).values * discount).sum(-1)
    defined = idcg > 0
    return torch.where(defined, dcg / idcg.clamp_min(1e-12), torch.zeros_like(dcg)), defined


def metric_sums(scores: list[Tensor], ks: list[int], batch: CascadeBatch, ndcg_k: int = 10,
                gt_k: int = 10) -> dict[str, float]:
    """Sums over the batch's requests of every metric, plus ``count`` and ``count_ndcg_<stage>``.

    Keys: ``joint_recall``, ``<stage>_recall`` (Recall@gt_k@k_stage on the whole list), ``<stage>_ndcg``.
    """
    gt = batch.ground_truth()
    n_gt = gt.sum(-1)
    has_gt = n_gt > 0
    denom = n_gt.clamp(min=1, max=gt_k).to(torch.float64)
    out: dict[str, float] = {"count": float(has_gt.sum())}
    final = cascade_selection(scores, ks, batch.mask)
    out["joint_recall"] = float(((final & gt).sum(-1) / denom)[has_gt].sum())
    for name, s, k in zip(stage_names(len(scores)), scores, ks, strict=True):
        chosen = select_topk(s, k, batch.mask)
        out[f"{name}_recall"] = float(((chosen & gt).sum(-1) / denom)[has_gt].sum())
        nd, defined = ndcg_at(s, batch.label, batch.mask, ndcg_k)
        out[f"{name}_ndcg"] = float(nd[defined].sum())
        out[f"count_ndcg_{name}"] = float(defined.sum())
    return out


def finalize(sums: dict[str, float]) -> dict[str, float]:
    """Turn accumulated sums into means: recall keys by ``count``, ndcg keys by their own count."""
    out = {}
    for key, value in sums.items():
        if key.startswith("count"):
            continue
        if key.endswith("_ndcg"):
            denom = sums.get(f"count_ndcg_{key[: -len('_ndcg')]}", 0.0)
        else:
            denom = sums.get("count", 0.0)
        out[key] = value / denom if denom > 0 else float("nan")
    return out
