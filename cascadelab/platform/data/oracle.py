"""Reference rankings of the logged candidates: what a perfect, a popularity-only and a random model score.

Each ranking is scored with the project's joint recall convention (cascadelab/cascade/metrics.py): per
request, the ``k`` best-scoring *valid* logged candidates are kept (one score for every stage, so the
cascade keeps the overall top ``k``); recall is ``|kept ∩ gt| / min(|gt|, gt_k)`` with ``gt`` = the valid
candidates of the ground-truth group (group 0 of the run's groups: rank_pos for two-stage runs,
rerank_pos for three-stage runs); requests without ground truth are skipped. ``k = 20`` and
``gt_k = 10`` are the last stage's k and the ground-truth quota of the shipped cascades (Joint R@10@20).

A ranking with no scores (``random``) is scored by its expectation: a uniformly random top ``k`` of ``v``
valid candidates holds each ground-truth item with probability ``min(k, v) / v``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

K = 20  # candidates the last stage keeps (Joint R@gt_k@K)
GT_K = 10  # ground-truth quota: recall divides by min(|gt|, GT_K)
RANDOM = "random"


def recall_sum(scores: np.ndarray, valid: np.ndarray, gt: np.ndarray, k: int = K,
               gt_k: int = GT_K) -> tuple[float, int]:
    """``scores, valid, gt: [n, m]`` -> (sum over requests with ground truth of their recall, their count).

    ``valid`` marks real candidates, ``gt`` the valid ground-truth ones; invalid slots are never kept.
    """
    n_gt = gt.sum(axis=1)
    has_gt = n_gt > 0
    keep = min(k, scores.shape[1])
    masked = np.where(valid, scores, -np.inf)
    top = np.argpartition(-masked, keep - 1, axis=1)[:, :keep]
    hits = (np.take_along_axis(gt, top, axis=1) & np.take_along_axis(valid, top, axis=1)).sum(axis=1)
    recall = hits / np.clip(n_gt, 1, gt_k)
    return float(recall[has_gt].sum()), int(has_gt.sum())


def expected_random_recall_sum(valid: np.ndarray, gt: np.ndarray, k: int = K,
                               gt_k: int = GT_K) -> tuple[float, int]:
    """Expected :func:`recall_sum` of a uniformly random ranking: ``|gt| * min(k, v) / (v * min(|gt|, gt_k))``
    per request with ``v`` valid candidates."""
    n_gt = gt.sum(axis=1)
    has_gt = n_gt > 0
    v = np.maximum(valid.sum(axis=1), 1)
    recall = n_gt * np.minimum(k, v) / (v * np.clip(n_gt, 1, gt_k))
    return float(recall[has_gt].sum()), int(has_gt.sum())


@dataclass
class RecallSums:
    """Recall sums per ranking name and the number of requests with ground truth (additive over chunks)."""

    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0

    def add(self, other: RecallSums) -> RecallSums:
        for name, value in other.sums.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.count += other.count
        return self

    def means(self) -> dict[str, float | int]:
        """``{ranking: mean recall, ..., "requests": count}`` (NaN means when no request has ground truth)."""
        out: dict[str, float | int] = {name: round(s / self.count, 6) if self.count else float("nan")
                                       for name, s in self.sums.items()}
        out["requests"] = self.count
        return out


def rank_all(scores: dict[str, np.ndarray], valid: np.ndarray, gt: np.ndarray) -> RecallSums:
    """Recall sums of every named ranking (``scores[name]: [n, m]``) plus the expected ``random`` one."""
    out = RecallSums()
    for name, s in scores.items():
        out.sums[name], out.count = recall_sum(s, valid, gt)
    out.sums[RANDOM], out.count = expected_random_recall_sum(valid, gt)
    return out


def summary(per_day: dict[str, dict[str, RecallSums]]) -> dict:
    """``dataset.json``'s ``extra.oracle``: ``{gt_k, k, <view>: {overall: means, per_day: {day: means}}}``,
    one view per cascade mode the data serves (``two_stage``, and ``three_stage`` for three-stage data)."""
    out: dict = {"gt_k": GT_K, "k": K}
    views = sorted({view for days in per_day.values() for view in days})
    for view in views:
        total = RecallSums()
        days = {}
        for day, sums in per_day.items():
            if view in sums:
                days[day] = sums[view].means()
                total.add(sums[view])
        out[view] = {"overall": total.means(), "per_day": days}
    return out
