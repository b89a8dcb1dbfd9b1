"""``cascadelab demo``'s table: its columns follow the configured stage list (no training here)."""

from cascadelab.jobs.demo import columns, format_table
from cascadelab.platform.config import load_config


def test_two_stage_columns_are_the_papers_table():
    assert columns(load_config()) == [
        ("joint_recall", "joint R@10@20"), ("retrieval_recall", "retr R@10@30"), ("retrieval_ndcg", "retr NDCG@10"),
        ("ranking_recall", "rank R@10@20"), ("ranking_ndcg", "rank NDCG@10"), ("samples_per_s", "samples/s"),
        ("wall_time_s", "wall s")]


def test_a_four_stage_table_shows_every_stage():
    cfg = load_config(None, ["stages=[{model: dssm, k: 40}, {model: mlp, k: 30}, {model: mlp, k: 25}, "
                             "{model: din, k: 20}]", "objective.gt_k=5"])
    cols = columns(cfg)
    assert [key for key, _ in cols][1:9] == ["retrieval_recall", "retrieval_ndcg", "prerank1_recall",
                                             "prerank1_ndcg", "prerank2_recall", "prerank2_ndcg",
                                             "ranking_recall", "ranking_ndcg"]
    assert cols[0] == ("joint_recall", "joint R@5@20") and ("prerank2_recall", "prerank2 R@5@25") in cols
    metrics = {key: 0.5 for key, _ in cols} | {"prerank1_ndcg": 0.25, "samples_per_s": 1234.4, "wall_time_s": 7.25}
    header, rule, row = format_table([("bce", metrics)], cols).splitlines()
    assert header.split(" | ")[5].strip() == "prerank1 NDCG@10" and set(rule) == {"-", "+"}
    assert [c.strip() for c in row.split(" | ")] == ["bce", "0.5000", "0.5000", "0.5000", "0.5000", "0.2500",
                                                   "0.5000", "0.5000", "0.5000", "0.5000", "1234", "7.2"]


def test_the_closing_hint_links_the_demo_experiment_in_the_model_training_view(sqlite_uri):
    from cascadelab.jobs.demo import EXPERIMENT, ui_hint
    from cascadelab.platform.tracking import Tracker

    assert ui_hint(sqlite_uri) == "http://127.0.0.1:5000"  # no demo run yet
    exp = Tracker.start(sqlite_uri, EXPERIMENT, "r").client.get_experiment_by_name(EXPERIMENT).experiment_id
    assert ui_hint(sqlite_uri) == f"http://127.0.0.1:5000/#/experiments/{exp}?workflowType=machine_learning"


def test_the_gap_line_gives_the_paired_interval_and_says_whether_it_is_outside_seed_noise():
    from cascadelab.jobs.demo import gap_lines

    bce = [(42, {"joint_recall": 0.74}), (43, {"joint_recall": 0.75}), (44, {"joint_recall": 0.76})]
    clear = [(42, {"joint_recall": 0.77}), (43, {"joint_recall": 0.79}), (44, {"joint_recall": 0.79})]
    # paired differences 0.03, 0.04, 0.03: mean 0.0333, sd 0.00577, t(0.975, 2) = 4.3027
    (line,) = gap_lines({"bce": bce, "dftopk": clear})
    assert line.startswith("dftopk - bce: +0.0333, 95% interval [+0.0190, +0.0477] (paired over 3 seeds)")
    assert line.endswith("outside seed noise") and "NOT" not in line
    noisy = [(42, {"joint_recall": 0.78}), (43, {"joint_recall": 0.74}), (44, {"joint_recall": 0.75})]
    (line,) = gap_lines({"bce": bce, "dftopk": noisy})
    assert "NOT outside seed noise" in line
    (line,) = gap_lines({"bce": bce[:1], "dftopk": clear[:1]})
    assert line == "dftopk - bce: +0.0300 (n=1: no interval; use --seeds 2 or more)"


def test_the_table_row_is_the_mean_over_seeds_of_the_shared_metrics():
    from cascadelab.jobs.demo import mean_metrics

    out = mean_metrics([(1, {"joint_recall": 0.5, "wall_time_s": 10.0}), (2, {"joint_recall": 0.7, "x": 1.0,
                                                                             "wall_time_s": 20.0})])
    assert out == {"joint_recall": 0.6, "wall_time_s": 15.0}
