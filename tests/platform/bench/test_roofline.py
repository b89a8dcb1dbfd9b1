import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cascadelab.cascade.cascade import Cascade
from cascadelab.platform.bench.roofline import cascade_cost, measure_peaks, roofline_samples_per_s
from cascadelab.platform.config import CascadeConfig, StageConfig
from tests.cascade.helpers import random_batch

TINY_VOCAB = {f: 1 for f in ("user_id", "device_id", "age", "gender", "province", "video_id", "author_id",
                             "category_level_two", "category_level_one", "upload_type")}


def test_cascade_cost_matches_a_hand_count_of_a_tiny_mlp_stage():
    cfg = CascadeConfig(stages=[StageConfig("mlp", 5)])
    cfg.model.emb_dim, cfg.model.hidden = 1, 2
    cost = cascade_cost(cfg, vocab=TINY_VOCAB, batch_size=1)
    # n = 4 groups x 10 slots = 40, L = 50, E = 1: user 8, sequence mean 5, item 8 features.
    # lookups: 8 + 250 + 320 = 578 ids -> backward 578 adds; 28 bytes per id (8 id, 4 x 5 row traffic)
    # masked mean [50, 5] -> [5]: 500 / 500 FLOPs, 4 (3 * 250 + 2 * 5) bytes
    # request part Linear(13, 2) no bias on 1 row; candidate part Linear(8, 2) on 40 rows; relu on 80
    # then Linear(2, 64), relu 2560, Linear(64, 32), relu 1280, Linear(32, 1), all on 40 rows
    forward = 500 + 52 + (1280 + 80) + 80 + (10240 + 2560) + 2560 + (163840 + 1280) + 1280 + (2560 + 40)
    backward = 578 + 500 + 104 + (2560 + 80) + 80 + (20480 + 2560) + 2560 + (327680 + 1280) + 1280 + (5120 + 40)
    stage_bytes = (28 * 578 + 4 * (750 + 10) + 4 * (39 + 4) + 4 * (960 + 160) + 4 * 400 + 4 * (240 + 5120)
                   + 4 * 12800 + 4 * (7680 + 2560) + 4 * 6400 + 4 * (3840 + 80))
    weights = 26 + 18 + 192 + 2080 + 33
    tables = 2 * 5 * 2 + (8 + 25 + 61) * 2  # 10 id fields of 2 rows, 6 time fields, E = 1
    params = weights + tables + 1  # + the objective's uncertainty weight of the one stage
    assert cost["flops_forward"] == forward == 186352
    assert cost["flops_backward"] == backward == 364902
    assert cost["parameters"] == params == 2558
    assert cost["flops_per_sample"] == forward + backward + 10 * params
    assert cost["bytes_per_sample"] == stage_bytes + 36 * params
    assert cost["flops_matmul"] == 6 * (26 + 640 + 5120 + 81920 + 1280)
    assert cost["intensity"] == pytest.approx(cost["flops_per_sample"] / cost["bytes_per_sample"])


def test_matmul_flops_of_the_default_cascade_match_torch_flop_counter():
    cfg = CascadeConfig()  # DSSM -> DIN, emb_dim 8, hidden 128, 40 candidates
    vocab = {"user_id": 50, "device_id": 40, "age": 8, "gender": 3, "province": 34, "video_id": 300,
             "author_id": 60, "category_level_two": 20, "category_level_one": 5, "upload_type": 4}
    torch.manual_seed(0)
    model = Cascade([s.model for s in cfg.stages], [s.k for s in cfg.stages], vocab, cfg.objective.name,
                    dict(vars(cfg.objective)), emb_dim=cfg.model.emb_dim, hidden=cfg.model.hidden)
    batch = random_batch(b=3, groups=4)
    with FlopCounterMode(display=False) as counter:
        _, out = model(batch)
        out.loss.backward()
    cost = cascade_cost(cfg, vocab=vocab)
    assert cost["flops_matmul"] == counter.get_total_flops() / batch.size
    assert cost["parameters"] == sum(p.numel() for p in model.parameters())
    assert cost["flops_stage0_dssm"] + cost["flops_stage1_din"] == cost["flops_forward"] + cost["flops_backward"]


def test_roofline_is_the_tighter_of_compute_and_bandwidth():
    cost = {"flops_per_sample": 1e6, "bytes_per_sample": 1e5}
    assert roofline_samples_per_s(cost, peak_flops=1e9, bandwidth=1e12) == 1000.0
    assert roofline_samples_per_s(cost, peak_flops=1e12, bandwidth=1e9) == 10000.0
    peaks = measure_peaks(size=64, copy_mib=1, repeats=2)
    assert all(math.isfinite(v) and v > 0 for v in peaks.values())
