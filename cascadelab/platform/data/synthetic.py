"""Synthetic RecFlow-shaped data with a planted, learnable user-item preference and a popularity skew.

The world (seeded): items belong to categories; each category has a latent vector, each item's vector
is its category's plus item noise; each user likes a few categories. A request's candidates are a
popularity-sampled pool ranked by a noisy "production funnel" utility; the funnel positions become the
RecFlow groups (two-stage: rank_pos = top 10, rank_neg = 10-19, coarse_neg and prerank_neg sampled from
deeper positions). The user's behaviour sequence is drawn from items they like, so the sequence and the
ids carry the preference and a trained cascade beats an untrained one by a wide margin.
Deterministic for a seed: day ``i`` draws from ``default_rng([seed, i])``. Ray is imported lazily, only
when the days are written in parallel.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from cascadelab.platform.data.schema import (
    ITEM_FIELDS,
    SEQ_FIELDS,
    SEQ_LEN,
    SLOTS,
    DataError,
    DatasetMeta,
    arrow_schema,
    day_dir,
    stored_groups,
)
from cascadelab.platform.data.timefeat import day_range, day_start_ms, local_time_features
from cascadelab.platform.runtime import ensure_ray

log = logging.getLogger(__name__)

POOL = 200  # candidates the simulated production funnel ranks per request
LATENT = 8


@dataclass
class SyntheticConfig:
    days: int = 4
    requests_per_day: int = 4096
    seed: int = 0
    start_day: str = "2024-01-13"
    mode: str = "two_stage"  # two_stage | three_stage
    vocab: dict[str, int] = field(default_factory=lambda: {
        "user_id": 2000, "device_id": 1800, "age": 8, "gender": 3, "province": 34,
        "video_id": 5000, "author_id": 800, "category_level_two": 64, "category_level_one": 8,
        "upload_type": 4,
    })
    popularity_skew: float = 1.0  # Zipf exponent of item popularity
    preference_strength: float = 2.0  # weight of the planted user-item affinity in the utility
    popularity_weight: float = 0.3  # weight of log-popularity in the utility
    funnel_noise: float = 0.5  # noise of the simulated production ranking (caps the reachable recall)
    pad_prob: float = 0.1  # probability that a group has fewer than 10 real candidates
    rows_per_file: int = 65536


@dataclass
class _World:
    item_cate2: np.ndarray
    item_cate1: np.ndarray
    item_author: np.ndarray
    item_utype: np.ndarray
    item_upload_ts: np.ndarray
    item_vec: np.ndarray  # [items, LATENT]
    item_logpop: np.ndarray  # [items]
    item_pop: _Popularity
    user_vec: np.ndarray  # [users, LATENT]
    user_device: np.ndarray
    user_age: np.ndarray
    user_gender: np.ndarray
    user_province: np.ndarray
    user_activity: np.ndarray  # sampling probabilities of users


def _zipf_cdf(x: np.ndarray, n: int, skew: float) -> np.ndarray:
    """CDF of a continuous power law on [1, n + 1] with exponent ``skew``."""
    if abs(skew - 1.0) < 1e-9:
        return np.log(x) / np.log(n + 1)
    return (x ** (1 - skew) - 1) / ((n + 1) ** (1 - skew) - 1)


def _zipf_rank(u: np.ndarray, n: int, skew: float) -> np.ndarray:
    """Inverse CDF: uniforms in [0, 1) -> 0-based popularity ranks, P(rank r) = F(r + 2) - F(r + 1)."""
    if abs(skew - 1.0) < 1e-9:
        x = np.exp(u * np.log(n + 1))
    else:
        x = (u * ((n + 1) ** (1 - skew) - 1) + 1) ** (1 / (1 - skew))
    return np.minimum(x.astype(np.int64) - 1, n - 1)


@dataclass
class _Popularity:
    """Item popularity: Zipf over ranks, ranks assigned to items by a random permutation."""

    item_of_rank: np.ndarray  # [n]
    prob: np.ndarray  # [n] probability of each item
    skew: float

    @classmethod
    def build(cls, n: int, skew: float, rng: np.random.Generator) -> _Popularity:
        edges = _zipf_cdf(np.arange(1, n + 2, dtype=np.float64), n, skew)
        perm = rng.permutation(n)
        prob = np.empty(n)
        prob[perm] = np.diff(edges)
        return cls(perm, prob, skew)

    def sample(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        """O(1) per draw (closed-form inverse CDF), whatever the catalogue size."""
        return self.item_of_rank[_zipf_rank(rng.random(shape), len(self.item_of_rank), self.skew)]


def _zipf_probs(n: int, skew: float, rng: np.random.Generator) -> np.ndarray:
    return _Popularity.build(n, skew, rng).prob


def _build_world(cfg: SyntheticConfig) -> _World:
    rng = np.random.default_rng([cfg.seed, 10**6])
    v = cfg.vocab
    n_items, n_users, n_c2 = v["video_id"], v["user_id"], v["category_level_two"]
    cate_vec = rng.normal(size=(n_c2, LATENT))
    item_cate2 = rng.integers(0, n_c2, n_items)
    item_vec = (cate_vec[item_cate2] + 0.5 * rng.normal(size=(n_items, LATENT))).astype(np.float32)
    favs = rng.integers(0, n_c2, (n_users, 3))
    user_vec = cate_vec[favs].mean(axis=1) + 0.3 * rng.normal(size=(n_users, LATENT))
    popularity = _Popularity.build(n_items, cfg.popularity_skew, rng)
    pop = popularity.prob
    return _World(
        item_cate2=item_cate2,
        item_cate1=item_cate2 % v["category_level_one"],
        item_author=rng.integers(0, v["author_id"], n_items),
        item_utype=rng.integers(0, v["upload_type"], n_items),
        item_upload_ts=day_start_ms(cfg.start_day) - rng.integers(0, 60 * 86_400_000, n_items),
        item_vec=item_vec / np.sqrt(LATENT),
        item_logpop=np.log(pop * n_items),
        item_pop=popularity,
        user_vec=user_vec,
        user_device=rng.integers(0, v["device_id"], n_users),
        user_age=rng.integers(0, v["age"], n_users),
        user_gender=rng.integers(0, v["gender"], n_users),
        user_province=rng.integers(0, v["province"], n_users),
        user_activity=_zipf_probs(n_users, 0.6, rng),
    )


def _item_features(w: _World, items: np.ndarray) -> np.ndarray:
    """``items: [...]`` 0-based ids -> ``[..., 8]`` ITEM_FIELDS, shifted so that 0 = padding."""
    wd, hr, mi = local_time_features(w.item_upload_ts[items].reshape(-1))
    cols = [items, w.item_author[items], w.item_cate2[items], w.item_cate1[items], w.item_utype[items],
            wd.reshape(items.shape), hr.reshape(items.shape), mi.reshape(items.shape)]
    return np.stack(cols, axis=-1).astype(np.int64) + 1


def _sample_pool(rng: np.random.Generator, pop: _Popularity, n: int, size: int) -> np.ndarray:
    """``n`` rows of ``size`` distinct items each, drawn by popularity.

    Independent of the catalogue size: draw twice as many items as needed, drop repeats within a row,
    keep the first ``size`` distinct draws (close to sampling without replacement, which would need a
    pass over the whole catalogue per row).
    """
    m = 2 * size
    draws = pop.sample(rng, (n, m))
    order = np.argsort(draws, axis=1, kind="stable")
    ranked = np.take_along_axis(draws, order, axis=1)
    dup = np.zeros_like(draws, dtype=bool)
    np.put_along_axis(dup, order[:, 1:], ranked[:, 1:] == ranked[:, :-1], axis=1)
    keep = np.argsort(np.arange(m)[None, :] + dup * m, axis=1, kind="stable")[:, :size]
    return np.take_along_axis(draws, keep, axis=1)


def _pad_mask(rng: np.random.Generator, n: int, pad_prob: float, min_valid: int) -> np.ndarray:
    valid = np.where(rng.random(n) < pad_prob, rng.integers(min_valid, SLOTS, n), SLOTS)
    return (np.arange(SLOTS)[None, :] < valid[:, None]).astype(np.int8)


def _group_columns(w: _World, items: np.ndarray, mask: np.ndarray, label: np.ndarray) -> dict:
    feats = _item_features(w, items) * mask[..., None]
    n = items.shape[0]
    return {
        "items": pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), SLOTS * len(ITEM_FIELDS)),
        "mask": pa.FixedSizeListArray.from_arrays(pa.array(mask.reshape(-1)), SLOTS),
        "label": pa.FixedSizeListArray.from_arrays(
            pa.array((label * mask).astype(np.float32).reshape(-1)), SLOTS),
        "_n": n,
    }


def chunk_sizes(cfg: SyntheticConfig) -> list[int]:
    """Requests per chunk of a day: chunks of ``rows_per_file``, each drawn from its own seeded stream."""
    full, rest = divmod(cfg.requests_per_day, cfg.rows_per_file)
    return [cfg.rows_per_file] * full + ([rest] if rest else [])


def generate_day(cfg: SyntheticConfig, w: _World, day_index: int, day: str) -> pa.Table:
    """One day of requests as an Arrow table in the project schema (see schema.py)."""
    return pa.concat_tables([generate_chunk(cfg, w, day_index, day, c, n) for c, n in enumerate(chunk_sizes(cfg))])


def generate_chunk(cfg: SyntheticConfig, w: _World, day_index: int, day: str, chunk: int, n: int) -> pa.Table:
    """``n`` requests of chunk ``chunk`` of day ``day_index``, from ``default_rng([seed, day, chunk])``."""
    rng = np.random.default_rng([cfg.seed, day_index, chunk])
    first_id = day_index * 10**10 + chunk * cfg.rows_per_file
    users = rng.choice(len(w.user_vec), size=n, p=w.user_activity)
    ts = day_start_ms(day) + rng.integers(0, 86_400_000, n)
    wd, hr, mi = local_time_features(ts)
    uvec = w.user_vec[users]  # [n, LATENT]

    def utility(items: np.ndarray) -> np.ndarray:  # [n, m] -> [n, m]
        aff = np.einsum("nd,nmd->nm", uvec, w.item_vec[items])
        return cfg.preference_strength * aff + cfg.popularity_weight * w.item_logpop[items]

    # Behaviour sequence: the items this user liked most among a popularity-sampled pool.
    seq_pool = _sample_pool(rng, w.item_pop, n, POOL)
    seq_keys = utility(seq_pool) + rng.gumbel(size=seq_pool.shape)
    seq_items = np.take_along_axis(seq_pool, np.argsort(-seq_keys, axis=1)[:, :SEQ_LEN], axis=1)
    seq_len = rng.integers(5, SEQ_LEN + 1, n)
    seq_mask = (np.arange(SEQ_LEN)[None, :] >= SEQ_LEN - seq_len[:, None]).astype(np.int8)  # front padding
    seq_feat = _item_features(w, seq_items)[..., : len(SEQ_FIELDS)] * seq_mask[..., None]

    # Candidates: a pool ranked by the simulated production funnel (utility + noise).
    pool = _sample_pool(rng, w.item_pop, n, POOL)
    funnel = utility(pool) + cfg.funnel_noise * rng.normal(size=pool.shape)
    ranked = np.take_along_axis(pool, np.argsort(-funnel, axis=1), axis=1)

    def deep(lo: int, hi: int) -> np.ndarray:  # 10 random funnel positions in [lo, hi) per request
        pos = lo + np.argsort(rng.random((n, hi - lo)), axis=1)[:, :SLOTS]
        return np.take_along_axis(ranked, np.sort(pos, axis=1), axis=1)

    top_index = np.arange(1, SLOTS + 1, dtype=np.float32)[None, :]  # rank_index / rerank_index 1..10
    const = np.ones((n, SLOTS), dtype=np.float32)
    if cfg.mode == "two_stage":
        spec = {
            "rank_pos": (ranked[:, :SLOTS], 30.0 - top_index * const, 3),
            "rank_neg": (ranked[:, SLOTS:2 * SLOTS], 7.0 * const, 1),
            "coarse_neg": (deep(20, 100), 6.0 * const, 1),
            "prerank_neg": (deep(100, POOL), 5.0 * const, 1),
        }
    else:
        spec = {
            "rerank_pos": (ranked[:, :SLOTS], 30.0 - top_index * const, 3),
            "rerank_neg": (ranked[:, SLOTS:2 * SLOTS], 8.0 * const, 1),
            "rank_pos": (ranked[:, :SLOTS], 30.0 - top_index * const, 3),
            "rank_neg": (ranked[:, 2 * SLOTS:3 * SLOTS], 7.0 * const, 1),
            "coarse_neg": (deep(30, 100), 6.0 * const, 1),
            "prerank_neg": (deep(100, POOL), 5.0 * const, 1),
        }
    cols: dict[str, pa.Array] = {
        "request_id": pa.array(first_id + np.arange(n, dtype=np.int64)),
        "user_id": pa.array(users + 1),
        "device_id": pa.array(w.user_device[users] + 1),
        "age": pa.array(w.user_age[users] + 1),
        "gender": pa.array(w.user_gender[users] + 1),
        "province": pa.array(w.user_province[users] + 1),
        "request_ts": pa.array(ts),
        "req_weekday": pa.array(wd + 1),
        "req_hour": pa.array(hr + 1),
        "req_minute": pa.array(mi + 1),
        "seq_items": pa.FixedSizeListArray.from_arrays(pa.array(seq_feat.reshape(-1)), SEQ_LEN * len(SEQ_FIELDS)),
        "seq_mask": pa.FixedSizeListArray.from_arrays(pa.array(seq_mask.reshape(-1)), SEQ_LEN),
    }
    # rerank_pos and rank_pos share padding so that both describe the same real items
    shared_pad = _pad_mask(rng, n, cfg.pad_prob, 3)
    for g in stored_groups(cfg.mode):
        items, label, min_valid = spec[g]
        mask = shared_pad if g in ("rank_pos", "rerank_pos") else _pad_mask(rng, n, cfg.pad_prob, min_valid)
        gc = _group_columns(w, items, mask, label)
        cols[f"{g}_items"], cols[f"{g}_mask"], cols[f"{g}_label"] = gc["items"], gc["mask"], gc["label"]
    return pa.Table.from_pydict(cols, schema=arrow_schema(cfg.mode))


def _write_chunk(cfg: SyntheticConfig, w: _World, day_index: int, day: str, chunk: int, n: int,
                 tmp: str) -> int:
    pq.write_table(generate_chunk(cfg, w, day_index, day, chunk, n), Path(tmp) / f"part-{chunk:05d}.parquet")
    return n


def generate(cfg: SyntheticConfig, out: str | Path, overwrite: bool = False,
             parallel: bool | None = None) -> DatasetMeta:
    """Write ``cfg.days`` days of synthetic data under ``out``; returns the dataset metadata.

    Each day is written as chunks of ``rows_per_file`` requests (one file each) into a temporary
    directory that is renamed when the day is complete. ``parallel`` (default: when Ray is already
    initialised or more than a million requests are asked for) writes the chunks as Ray tasks; the output
    is identical either way, since every chunk draws from its own seeded stream.
    """
    if cfg.days <= 0 or cfg.requests_per_day <= 0:
        raise DataError(f"generate: --days and --requests-per-day must be positive, got "
                        f"{cfg.days} and {cfg.requests_per_day}")
    if cfg.vocab.get("video_id", 0) < 2 * POOL:
        raise DataError(f"generate: vocab video_id must be at least {2 * POOL}, got {cfg.vocab.get('video_id')}")
    root = Path(out)
    if root.exists() and any(root.iterdir()) and not overwrite:
        raise DataError(f"output directory '{root}' is not empty; pass --overwrite to replace it")
    if root.exists() and overwrite:
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    world = _build_world(cfg)
    days = day_range(cfg.start_day, cfg.days)
    meta = DatasetMeta(mode=cfg.mode, days=[], vocab=dict(cfg.vocab), source="synthetic",
                       extra={"seed": cfg.seed, "requests_per_day": cfg.requests_per_day,
                              "rows_per_file": cfg.rows_per_file})
    if parallel is None:
        import ray

        parallel = ray.is_initialized() or cfg.days * cfg.requests_per_day > 1_000_000
    tmps = {day: root / f".tmp-day={day}" for day in days}
    for tmp in tmps.values():
        tmp.mkdir()
    jobs = [(i, day, c, n) for i, day in enumerate(days) for c, n in enumerate(chunk_sizes(cfg))]
    if parallel:
        import ray

        ensure_ray()
        task = ray.remote(num_cpus=1)(_write_chunk)
        world_ref = ray.put(world)
        refs = {day: [task.remote(cfg, world_ref, i, d, c, n, str(tmps[day])) for i, d, c, n in jobs if d == day]
                for day in days}
    for day in tqdm(days, desc="generate", unit="day", leave=False):
        if parallel:
            rows = sum(ray.get(refs[day]))
        else:
            rows = sum(_write_chunk(cfg, world, i, d, c, n, str(tmps[day])) for i, d, c, n in jobs if d == day)
        final = day_dir(root, day)
        tmps[day].rename(final)
        meta.days.append(day)
        meta.rows_per_day[day] = rows
        log.info("wrote %s: %d requests", final, rows)
    meta.write(root)
    return meta
