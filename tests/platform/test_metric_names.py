"""MLflow metric names: the loop's keys as MLflow shows them, and back (no Ray; MLflow only as a real store)."""

from __future__ import annotations

import inspect

import pytest
from mlflow import MlflowClient

from cascadelab.cascade.metrics import metric_names, metric_sums
from cascadelab.platform.config import load_config
from cascadelab.platform.metric_names import (
    LOSS_TOTAL,
    NDCG_K,
    SKIPPED_FILES,
    MetricNames,
    final_report,
    internal_metrics,
    internal_name,
    logged_as,
)
from cascadelab.platform.tracking import Tracker

TWO = MetricNames.of(load_config(None, []))  # DSSM top-30 -> DIN top-20, gt_k 10
DAY = {  # a dftopk day with streaming evaluation, keyed as the worker loop reports it
    "train_loss": 1.5, "dftopk_retrieval": 0.5, "dftopk_ranking": 0.4, "dftopk_joint": 0.6,
    "dftopk_weight_retrieval": 1.1, "samples_per_s": 900.0, "samples_per_s_worker0": 450.0,
    "samples_per_s_worker1": 450.0, "step_time_s": 0.05, "data_wait_share": 0.1, "first_batch_s": 2.0,
    "stream_joint_recall": 0.7, "stream_retrieval_recall": 0.9, "stream_ranking_ndcg": 0.6,
}
FINAL = {"joint_recall": 0.8, "retrieval_recall": 0.95, "retrieval_ndcg": 0.6, "ranking_recall": 0.85,
         "ranking_ndcg": 0.7, "samples_per_s": 800.0, "train_rows": 576.0, "global_steps": 9.0,
         "world_size": 1.0, "wall_time_s": 30.0}


def test_a_day_is_named_by_section_loss_throughput_stream():
    assert TWO.day(DAY) == {
        "loss/total": 1.5, "loss/dftopk_retrieval": 0.5, "loss/dftopk_ranking": 0.4, "loss/dftopk_joint": 0.6,
        "loss/dftopk_weight_retrieval": 1.1, "throughput/samples_per_s": 900.0,
        "throughput/samples_per_s_worker0": 450.0, "throughput/samples_per_s_worker1": 450.0,
        "throughput/step_time_s": 0.05, "throughput/data_wait_share": 0.1, "throughput/first_batch_s": 2.0,
        "stream/joint_recall_at_10_20": 0.7, "stream/retrieval_recall_at_10_30": 0.9,
        "stream/ranking_ndcg_at_10": 0.6,
    }
    assert TWO.day_name("bce_ranking") == "loss/bce_ranking"  # any objective's term, by rule
    assert TWO.day_name("train_loss") == LOSS_TOTAL


def test_the_end_of_a_run_is_named_eval_throughput_total_and_run():
    assert TWO.final(FINAL) == {
        "eval/joint_recall_at_10_20": 0.8, "eval/retrieval_recall_at_10_30": 0.95,
        "eval/retrieval_ndcg_at_10": 0.6, "eval/ranking_recall_at_10_20": 0.85, "eval/ranking_ndcg_at_10": 0.7,
        "throughput/samples_per_s_total": 800.0, "run/train_rows": 576.0, "run/global_steps": 9.0,
        "run/world_size": 1.0, "run/wall_time_s": 30.0,
    }


def test_a_parent_run_summarises_under_its_own_sections():
    assert TWO.summary_name("joint_recall", "best") == "best/joint_recall_at_10_20"
    assert TWO.summary_name("samples_per_s", "mean") == "mean/samples_per_s_total"
    assert TWO.summary_name("wall_time_s", "std") == "std/wall_time_s"
    assert internal_name("mean/joint_recall_at_10_20") == "mean/joint_recall_at_10_20"  # not a run's own


def test_per_day_series_and_the_runs_end_never_share_a_name():
    day = set(TWO.day(DAY))
    assert not day & set(TWO.final(FINAL))
    assert "throughput/samples_per_s" in day and TWO.final_name("samples_per_s") != "throughput/samples_per_s"


def test_names_follow_the_cascades_cutoffs():
    four = "stages=[{model: dssm, k: 40}, {model: mlp, k: 30}, {model: mlp, k: 25}, {model: din, k: 12}]"
    cfg = load_config(None, ["objective.gt_k=5", four])
    names = MetricNames.of(cfg)
    assert [names.final_name(k) for k in metric_names(4)] == [
        "eval/joint_recall_at_5_12", "eval/retrieval_recall_at_5_40", f"eval/retrieval_ndcg_at_{NDCG_K}",
        "eval/prerank1_recall_at_5_30", "eval/prerank1_ndcg_at_10", "eval/prerank2_recall_at_5_25",
        "eval/prerank2_ndcg_at_10", "eval/ranking_recall_at_5_12", "eval/ranking_ndcg_at_10"]
    assert names.day_name("stream_prerank2_recall") == "stream/prerank2_recall_at_5_25"


def test_the_ndcg_cutoff_is_the_evaluations():
    assert NDCG_K == inspect.signature(metric_sums).parameters["ndcg_k"].default


def test_every_name_reads_back_as_its_key_without_the_config():
    for key in DAY:
        assert internal_name(TWO.day_name(key)) == key, key
    for key in FINAL:
        expected = "samples_per_s_total" if key == "samples_per_s" else key
        assert internal_name(TWO.final_name(key)) == expected, key
    assert final_report(TWO.final(FINAL)) == FINAL
    assert internal_name(SKIPPED_FILES) == "data_skipped_files"


@pytest.mark.parametrize("name", ["joint_recall", "samples_per_s_total", "train_loss", "dftopk_joint",
                                  "system/cpu_utilization_percentage", "best/joint_recall_at_10_20",
                                  "eval/joint_recall_at_10_20_mean", "eval/something", "stream/joint_recall"])
def test_old_names_and_other_sections_pass_through(name):
    assert internal_name(name) == name


def test_a_run_with_both_names_reads_the_current_one():
    logged = {"joint_recall": 0.1, "eval/joint_recall_at_10_20": 0.8, "samples_per_s": 5.0,
              "stream_joint_recall": 0.2}
    assert internal_metrics(logged) == {"joint_recall": 0.8, "samples_per_s": 5.0, "stream_joint_recall": 0.2}
    assert logged_as(logged, "joint_recall") == "eval/joint_recall_at_10_20"
    assert logged_as(logged, "stream_joint_recall") == "stream_joint_recall"
    assert logged_as(logged, "ranking_recall") is None
    assert final_report({"samples_per_s": 1.0, "samples_per_s_total": 2.0}) == {"samples_per_s": 2.0}


def test_the_names_are_accepted_by_mlflow_and_read_back(sqlite_uri):
    tracker = Tracker.start(sqlite_uri, "names", "r")
    for step in (0, 1):
        tracker.log_dict(TWO.day(DAY), step=step)
    tracker.log_dict(TWO.final(FINAL), step=2)
    tracker.close()
    logged = MlflowClient(sqlite_uri).get_run(tracker.run_id).data.metrics
    assert final_report(logged) == {**DAY, **FINAL}  # the run's total rate is the final samples_per_s
    assert [s for s, _ in tracker.history(TWO.day_name("stream_joint_recall"))] == [0, 1]
    assert [s for s, _ in tracker.history("throughput/samples_per_s")] == [0, 1]  # per-day values only
