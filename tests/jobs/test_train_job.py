"""``cascadelab train``: what the repeated-seeds summary prints follows the stage list."""

from __future__ import annotations

from cascadelab.jobs.train import mean_std, summary_keys


def test_summary_keys_cover_every_stage():
    assert summary_keys(2) == ["joint_recall", "retrieval_recall", "retrieval_ndcg", "ranking_recall", "ranking_ndcg",
                               "samples_per_s"]
    four = summary_keys(4)
    assert [k for k in four if k.endswith("_recall")] == ["joint_recall", "retrieval_recall", "prerank1_recall",
                                                          "prerank2_recall", "ranking_recall"]


def test_mean_std_over_seeds_keeps_keys_every_run_has():
    stats = mean_std([{"a": 1.0, "b": 2.0}, {"a": 3.0}])
    assert stats == {"a": (2.0, 1.4142135623730951)}
    assert mean_std([{"a": 1.0}]) == {"a": (1.0, 0.0)}
