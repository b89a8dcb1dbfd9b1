"""A small synthetic RecFlow release in the exact public layout (recflow_layout.md §1), for converter tests.

    <base>/all_stage/<day>.feather            one row per (request, candidate), shuffled, many record batches
    <base>/realshow/<day>.feather             the realshow == 1 rows
    <base>/seq_effective_50_dict/<day>.pkl    {request_id (int): int64 [50, 10]}, front-padded
    <base>/request_id_dict/<day>.pkl          {request_id (np.int64): {stage: int64 [n, 8]}}
    <base>/others/id_cnt.pkl                  {field: count}, with the 'photo_id' and ' category_level_two' keys

Request ``SPECIAL_RID`` (day 0, first request) has literal values that the tests check by hand. Planted
oddities: short groups (padding), coarse_neg / prerank_neg with more than 10 rows, absent stages,
positives missing from all_stage (lookup misses, see MISSES), junk in a padded sequence row.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd

DAYS = ("2024-01-13", "2024-01-14")
STAGES = ("rerank_pos", "rerank_neg", "rank_pos", "rank_neg", "coarse_neg", "prerank_neg")
N_VIDEOS = 200
SPECIAL_RID = 1_000_000
# id_cnt as released (the keys the reference loaders disagree on); video_id and author_id undercount
ID_CNT = {"user_id": 20, "device_id": 15, "age": 8, "gender": 3, "province": 34, "photo_id": 150,
          "author_id": 30, " category_level_two": 23, "category_level_one": 5, "upload_type": 3}
# (day index, request index, stage, slot) of the positives dropped from all_stage
MISS_SLOTS = ((0, 0, "rank_pos", 3), (0, 1, "rerank_pos", 0), (1, 5, "rank_pos", 0))
MISSES = {  # expected lookup misses per day and group
    "two_stage": {DAYS[0]: {"rank_pos": 1}, DAYS[1]: {"rank_pos": 1}},
    "three_stage": {DAYS[0]: {"rerank_pos": 1, "rank_pos": 1}, DAYS[1]: {"rerank_pos": 0, "rank_pos": 1}},
}

TS_SAT_0030 = 1705077000123  # ms: Sat 2024-01-13 00:30:00.123 Asia/Shanghai (Fri 08:30 in Los Angeles)
UP_WED_2359 = 1704902340  # s: Wed 2024-01-10 23:59 Asia/Shanghai (15:59 UTC)
UP_WED_0800 = 1704844800  # s: Wed 2024-01-10 08:00 Asia/Shanghai (00:00 UTC)

ALL_STAGE_COLUMNS = (
    "request_id", "user_id", "request_timestamp", "device_id", "age", "gender", "province", "video_id",
    "author_id", "category_level_two", "upload_type", "upload_timestamp", "category_level_one",
    "effective_view", "realshow", "rerank_pos", "rerank_neg", "rank_pos", "rank_neg", "coarse_neg",
    "prerank_neg", "rank_index", "rerank_index", "duration", "playing_time", "long_view", "like", "follow",
    "forward", "comment")


def _video_rows(vids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[n, 8]: video_id, author_id, duration, category_level_two, upload_type, upload_timestamp (s),
    category_level_one, effective_view."""
    return np.stack([vids, vids % 37, 5000 + 37 * vids, vids % 23, vids % 3, 1_704_000_000 + 3607 * vids,
                     vids % 5, rng.integers(0, 2, len(vids))], axis=1).astype(np.int64)


def _special_request() -> tuple[dict, np.ndarray, dict]:
    """The hand-checked request: (request fields, sequence [50, 10], {stage: (rows [n, 8], index)})."""
    fields = {"user_id": 4, "device_id": 9, "age": 2, "gender": 1, "province": 17, "request_timestamp": TS_SAT_0030}
    seq = np.zeros((50, 10), np.int64)
    seq[0] = [99, 9, 9, 9, 9, 0, 0, 0, 0, 0]  # junk in a padded row (request_ts 0): must come out as 0
    seq[47] = [11, 5, 7, 0, 2, 1_704_000_000, 9000, 1_705_000_000_000, 3000, 555]
    seq[48] = [12, 6, 8, 4, 0, 1_704_000_100, 9100, 1_705_000_100_000, 3100, 556]
    seq[49] = [13, 36, 22, 1, 1, 1_704_000_200, 9200, 1_705_000_200_000, 3200, 557]
    groups = {
        "rank_pos": (np.array([[50, 7, 15000, 3, 1, UP_WED_2359, 0, 1],
                               [51, 8, 20000, 4, 0, UP_WED_0800, 2, 0],
                               [52, 9, 21000, 5, 2, UP_WED_2359, 4, 1],
                               [53, 10, 22000, 6, 1, UP_WED_0800, 1, 0]]),  # slot 3: missing from all_stage
                     np.array([2, 1, 5, 3])),
        "rerank_pos": (np.array([[60, 11, 1000, 7, 0, UP_WED_0800, 3, 1],
                                 [61, 12, 1000, 8, 1, UP_WED_2359, 0, 0]]), np.array([3, 1])),
        # rerank_neg and prerank_neg: absent
        "rank_neg": (np.array([[70 + k, 36, 1000, 9, 2, UP_WED_0800, 1, 0] for k in range(10)]), None),
        "coarse_neg": (np.array([[250, 1, 1000, 1, 0, UP_WED_0800, 1, 0]]
                                + [[80 + k, 1, 1000, 1, 0, UP_WED_0800, 1, 0] for k in range(9)]
                                + [[300, 1, 1000, 1, 0, UP_WED_0800, 1, 0]] * 2), None),  # rows 10, 11 cut
    }
    return fields, seq, groups


def _day(di: int, day: str, n: int, rng: np.random.Generator):
    day0_ms = int(pd.Timestamp(day, tz="Asia/Shanghai").timestamp() * 1000)
    rids = (di + 1) * 1_000_000 + np.arange(n, dtype=np.int64)
    req = pd.DataFrame({
        "request_id": rids,
        "user_id": rng.integers(0, 20, n), "device_id": rng.integers(0, 15, n), "age": rng.integers(0, 8, n),
        "gender": rng.integers(0, 3, n), "province": rng.integers(0, 34, n),
        "request_timestamp": day0_ms + rng.integers(0, 86_400_000, n),
    })
    seq_dict: dict[int, np.ndarray] = {}
    req_dict: dict[np.int64, dict[str, np.ndarray]] = {}
    index: dict[tuple[int, str], np.ndarray] = {}  # (request, stage) -> (re)rank_index per row
    drop = {(rids[i], st, slot) for d, i, st, slot in MISS_SLOTS if d == di and i < n}
    sizes = {"rerank_pos": 6, "rerank_neg": 4, "rank_pos": 10, "rank_neg": 10, "coarse_neg": 12, "prerank_neg": 15}
    for i, rid in enumerate(rids.tolist()):
        length = int(rng.integers(0, 51))
        seq = np.zeros((50, 10), np.int64)
        if length:
            v = rng.integers(0, N_VIDEOS, length)
            rows = _video_rows(v, rng)
            seq[50 - length:, :5] = rows[:, [0, 1, 3, 6, 4]]
            seq[50 - length:, 5] = rows[:, 5]
            seq[50 - length:, 6] = rows[:, 2]
            seq[50 - length:, 7] = day0_ms - rng.integers(1, 10**9, length)
            seq[50 - length:, 8] = rng.integers(0, 10**5, length)
            seq[50 - length:, 9] = rng.integers(1, 10**6, length)
        stages: dict[str, np.ndarray] = {}
        pool = iter(rng.permutation(N_VIDEOS).tolist())
        for st in STAGES:
            if st in ("rerank_neg", "prerank_neg") and rng.random() < 0.15:
                continue  # stage absent for this request
            k = sizes[st] if rng.random() > 0.25 else int(rng.integers(1, 10))
            stages[st] = _video_rows(np.array([next(pool) for _ in range(k)]), rng)
            if st.endswith("_pos"):
                index[(i, st)] = rng.permutation(k) + 1
        if rid == SPECIAL_RID:
            fields, seq, special = _special_request()
            for c, v in fields.items():
                req.loc[i, c] = v
            stages = {st: rows for st, (rows, _) in special.items()}
            index.update({(i, st): idx for st, (_, idx) in special.items() if idx is not None})
        seq_dict[rid] = seq
        req_dict[np.int64(rid)] = stages
    # all_stage: one row per (request, candidate) of every stage, minus the planted misses
    parts = []
    for i, rid in enumerate(rids.tolist()):
        for st, rows in req_dict[np.int64(rid)].items():
            keep = np.array([(rid, st, s) not in drop for s in range(len(rows))], bool)
            part = pd.DataFrame(rows[keep], columns=["video_id", "author_id", "duration", "category_level_two",
                                                    "upload_type", "upload_timestamp", "category_level_one",
                                                    "effective_view"])
            part["request_index"] = i
            for flag in STAGES:
                part[flag] = int(flag == st)
            idx = index.get((i, st))
            part["rank_index"] = idx[keep] if st == "rank_pos" else (0 if st != "rank_neg" else 11)
            part["rerank_index"] = idx[keep] if st == "rerank_pos" else 0
            parts.append(part)
    rows = pd.concat(parts, ignore_index=True)
    rows = pd.concat([req.iloc[rows.pop("request_index").to_numpy()].reset_index(drop=True), rows], axis=1)
    rows["realshow"] = rows["rerank_pos"]
    nrow = len(rows)
    rows["playing_time"] = rng.integers(0, 60_000, nrow) * rows["realshow"]
    for c in ("long_view", "like", "follow", "forward", "comment"):
        rows[c] = rng.integers(0, 2, nrow) * rows["realshow"]
    rows = rows[list(ALL_STAGE_COLUMNS)].astype(np.int64)
    rows = rows.iloc[rng.permutation(nrow)].reset_index(drop=True)
    return rows, seq_dict, req_dict


def write_recflow_fixture(root: str | Path, n_requests: int = 30, days: tuple[str, ...] = DAYS, seed: int = 0,
                          data_subdir: bool = False, batch_rows: int = 97) -> Path:
    """Write the release under ``root`` (or ``root/data``); returns the release directory."""
    base = Path(root) / "data" if data_subdir else Path(root)
    for sub in ("all_stage", "realshow", "seq_effective_50_dict", "request_id_dict", "others"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for di, day in enumerate(days):
        rows, seq_dict, req_dict = _day(di, day, n_requests, np.random.default_rng([seed, di]))
        rows.to_feather(base / "all_stage" / f"{day}.feather", chunksize=batch_rows)
        rows[rows["realshow"] == 1].reset_index(drop=True).to_feather(base / "realshow" / f"{day}.feather")
        with open(base / "seq_effective_50_dict" / f"{day}.pkl", "wb") as f:
            pickle.dump(seq_dict, f, protocol=pickle.HIGHEST_PROTOCOL)
        with open(base / "request_id_dict" / f"{day}.pkl", "wb") as f:
            pickle.dump(req_dict, f, protocol=pickle.HIGHEST_PROTOCOL)
    with open(base / "others" / "id_cnt.pkl", "wb") as f:
        pickle.dump(dict(ID_CNT), f)
    return base
