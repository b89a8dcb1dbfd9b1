import math

import torch

from cascadelab.cascade.batch import CascadeBatch
from cascadelab.cascade.metrics import cascade_selection, finalize, metric_names, metric_sums, ndcg_at, stage_names


def _batch(mask, label, slots=2):
    b, n = mask.shape
    return CascadeBatch(user=torch.ones(b, 8, dtype=torch.long), seq=torch.ones(b, 3, 5, dtype=torch.long),
                        seq_mask=torch.ones(b, 3, dtype=torch.bool), items=torch.ones(b, n, 8, dtype=torch.long),
                        mask=mask, label=label, slots_per_group=slots)


def test_stage_names():
    assert stage_names(2) == ["retrieval", "ranking"]
    assert stage_names(3) == ["retrieval", "prerank", "ranking"]
    assert stage_names(4) == ["retrieval", "prerank1", "prerank2", "ranking"]
    assert stage_names(1) == ["ranking"]


def test_metric_names_are_the_keys_metric_sums_produces_for_any_depth():
    b, n = 2, 8
    mask = torch.ones(b, n, dtype=torch.bool)
    label = torch.arange(n, 0, -1, dtype=torch.float32).repeat(b, 1)
    for depth in (2, 3, 4):
        ks = [6, 5, 4, 3][:depth]
        scores = [torch.randn(b, n) for _ in ks]
        sums = metric_sums(scores, ks, _batch(mask, label))
        keys = [k for k in sums if k != "count" and not k.startswith("count_")]
        assert sorted(keys) == sorted(metric_names(depth))
        assert metric_names(depth)[0] == "joint_recall" and len(metric_names(depth)) == 1 + 2 * depth
    assert metric_names(3, ndcg=False) == ["joint_recall", "retrieval_recall", "prerank_recall", "ranking_recall"]


def test_two_stage_joint_recall_hand_computed():
    # 6 candidates, groups of 2: slots 0,1 are ground truth. Retrieval keeps 4, ranking keeps 2.
    mask = torch.ones(1, 6, dtype=torch.bool)
    label = torch.tensor([[29.0, 28.0, 7.0, 7.0, 6.0, 6.0]])
    retr = torch.tensor([[0.9, 0.1, 0.8, 0.7, 0.6, 0.0]])  # keeps 0,2,3,4 (drops GT slot 1)
    rank = torch.tensor([[0.5, 0.9, 0.1, 0.7, 0.0, 0.0]])  # among kept: 3 (0.7), 0 (0.5)
    sums = metric_sums([retr, rank], [4, 2], _batch(mask, label), gt_k=2)
    m = finalize(sums)
    assert m["joint_recall"] == 0.5  # slot 0 survives both stages, slot 1 was cut by retrieval
    assert m["retrieval_recall"] == 0.5  # top-4 by retrieval on the whole list holds slot 0 only
    assert m["ranking_recall"] == 0.5  # top-2 by ranking on the whole list: slots 1 and 3


def test_ranking_stage_recall_on_whole_list():
    mask = torch.ones(1, 6, dtype=torch.bool)
    label = torch.tensor([[29.0, 28.0, 7.0, 7.0, 6.0, 6.0]])
    rank = torch.tensor([[0.5, 0.9, 0.1, 0.7, 0.0, 0.0]])
    m = finalize(metric_sums([rank], [2], _batch(mask, label), gt_k=2))
    assert m["ranking_recall"] == 0.5


def test_three_stage_selection_hand_computed():
    mask = torch.tensor([[True, True, True, True, True, False]])
    s1 = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 9.0]])  # padded slot 5 is never selected
    s2 = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    s3 = torch.tensor([[3.0, 1.0, 2.0, 0.0, 0.0, 0.0]])
    kept = cascade_selection([s1, s2, s3], [4, 3, 1], mask)  # 0,1,2,3 -> 1,2,3 -> 2
    assert kept.tolist() == [[False, False, True, False, False, False]]
    label = torch.tensor([[29.0, 28.0, 27.0, 7.0, 7.0, 0.0]])
    m = finalize(metric_sums([s1, s2, s3], [4, 3, 1], _batch(mask, label, slots=3), gt_k=3))
    assert math.isclose(m["joint_recall"], 1 / 3)


def test_padded_ground_truth_not_counted_and_rows_without_gt_skipped():
    mask = torch.tensor([[True, False, True, True], [False, False, True, True]])
    label = torch.tensor([[29.0, 0.0, 7.0, 7.0], [0.0, 0.0, 7.0, 7.0]])
    s = torch.tensor([[1.0, 9.0, 0.0, 0.0], [0.0, 0.0, 1.0, 2.0]])
    sums = metric_sums([s], [1], _batch(mask, label), gt_k=2)
    assert sums["count"] == 1.0  # the second request has no real ground truth
    assert finalize(sums)["ranking_recall"] == 1.0  # 1 of 1 real GT item, the padded slot is ignored


def test_ndcg_hand_computed():
    scores = torch.tensor([[0.1, 0.9, 0.5]])
    gains = torch.tensor([[3.0, 1.0, 2.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    nd, ok = ndcg_at(scores, gains, mask, k=3)
    dcg = 1.0 / math.log2(2) + 2.0 / math.log2(3) + 3.0 / math.log2(4)
    idcg = 3.0 / math.log2(2) + 2.0 / math.log2(3) + 1.0 / math.log2(4)
    assert ok.all() and math.isclose(nd.item(), dcg / idcg, rel_tol=1e-6)


def test_three_stage_joint_recall_with_padding_hand_computed():
    # 3 groups of 3 slots. Request 0: GT slots 0, 1 valid, slot 2 padded; padded slot 5 scores highest
    # everywhere. Cascade 5 -> 3 -> 2.
    mask = torch.tensor([[True, True, False, True, True, False, True, True, True]])
    label = torch.tensor([[29.0, 28.0, 0.0, 7.0, 7.0, 0.0, 6.0, 6.0, 6.0]])
    s1 = torch.tensor([[5.0, 1.0, 9.0, 4.0, 3.0, 9.0, 2.0, 6.0, 0.0]])  # keeps 7, 0, 3, 4, 6 (slot 1 cut)
    s2 = torch.tensor([[3.0, 9.0, 9.0, 1.0, 2.0, 9.0, 0.0, 4.0, 0.0]])  # of those keeps 7, 0, 4
    s3 = torch.tensor([[2.0, 0.0, 9.0, 0.0, 1.0, 9.0, 0.0, 3.0, 0.0]])  # of those keeps 7, 0
    kept = cascade_selection([s1, s2, s3], [5, 3, 2], mask)
    assert kept.nonzero()[:, 1].tolist() == [0, 7]
    m = finalize(metric_sums([s1, s2, s3], [5, 3, 2], _batch(mask, label, slots=3), gt_k=3))
    assert m["joint_recall"] == 0.5  # 1 of the 2 real GT items (the padded GT slot does not count)
    assert m["retrieval_recall"] == 0.5  # per-stage recall on the whole list: top-5 of s1 holds slot 0 only
    assert m["prerank_recall"] == 1.0  # top-3 of s2: slots 1, 7, 0
    assert m["ranking_recall"] == 0.5  # top-2 of s3: slots 7, 0
