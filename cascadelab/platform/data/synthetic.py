"""Synthetic RecFlow-shaped data with a planted, learnable user-item preference and a popularity skew.

The world (seeded): items belong to categories; each category has a latent vector, each item's vector
is its category's plus item noise; each user likes a few categories. A request's candidates are a
popularity-sampled pool ranked by a noisy "production funnel" utility; the funnel positions become the
RecFlow groups (two-stage: rank_pos = top 10, rank_neg = 10-19, coarse_neg and prerank_neg sampled from
deeper positions). The user's behaviour sequence is drawn from items they like, so the sequence and the
ids carry the preference and a trained cascade beats an untrained one by a wide margin.

Because the generator knows the utility, ``dataset.json`` records what reference rankings of the logged
candidates score (``extra.oracle``, see oracle.py): the ceiling a model of this world can reach and the
floors of popularity-only and random rankings.

Deterministic for a seed: the world draws from ``default_rng([seed, 10**6])``, chunk ``c`` of day ``i``
from ``default_rng([seed, i, c])``. Ray is imported lazily, only when the days are written in parallel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from cascadelab.platform.data import oracle
from cascadelab.platform.data.daywriter import replaced_when_complete
from cascadelab.platform.data.schema import (
    ITEM_FIELDS,
    MAX_GRADE,
    SEQ_FIELDS,
    SEQ_LEN,
    SLOTS,
    DataError,
    DatasetMeta,
    arrow_schema,
    day_dir,
    groups_for,
    stored_groups,
    write_error,
)
from cascadelab.platform.data.timefeat import day_range, day_start_ms, local_time_features
from cascadelab.platform.runtime import ensure_ray

log = logging.getLogger(__name__)

POOL = 200  # candidates the simulated production funnel ranks per request
LATENT = 8
POSITIVE_GROUPS = ("rank_pos", "rerank_pos")


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
    item_spread: float = 0.5  # sd of an item's own latent part around its category's vector
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
    item_vec = (cate_vec[item_cate2] + cfg.item_spread * rng.normal(size=(n_items, LATENT))).astype(np.float32)
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


def chunk_sizes(cfg: SyntheticConfig) -> list[int]:
    """Requests per chunk of a day: chunks of ``rows_per_file``, each drawn from its own seeded stream."""
    full, rest = divmod(cfg.requests_per_day, cfg.rows_per_file)
    return [cfg.rows_per_file] * full + ([rest] if rest else [])


def utility(cfg: SyntheticConfig, w: _World, uvec: np.ndarray, items: np.ndarray) -> np.ndarray:
    """The world's noise-free utility ``[n, m]`` of ``items: [n, m]`` (0-based) for users ``uvec: [n, LATENT]``:
    ``preference_strength * <user_vec, item_vec> + popularity_weight * log-popularity``."""
    return cfg.preference_strength * _affinity(w, uvec, items) + cfg.popularity_weight * w.item_logpop[items]


def _affinity(w: _World, uvec: np.ndarray, items: np.ndarray) -> np.ndarray:
    return np.einsum("nd,nmd->nm", uvec, w.item_vec[items])


@dataclass
class _Chunk:
    """One chunk's draws: its table, the users' vectors ``uvec: [n, LATENT]`` and, per stored group, the
    candidates ``items: [n, SLOTS]`` (0-based ids, on padded slots too) and their ``masks: [n, SLOTS]``."""

    table: pa.Table
    uvec: np.ndarray
    items: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]


def generate_day(cfg: SyntheticConfig, w: _World, day_index: int, day: str) -> pa.Table:
    """One day of requests as an Arrow table in the project schema (see schema.py)."""
    return pa.concat_tables([generate_chunk(cfg, w, day_index, day, c, n) for c, n in enumerate(chunk_sizes(cfg))])


def generate_chunk(cfg: SyntheticConfig, w: _World, day_index: int, day: str, chunk: int, n: int) -> pa.Table:
    """``n`` requests of chunk ``chunk`` of day ``day_index``, from ``default_rng([seed, day, chunk])``."""
    return _draw_chunk(cfg, w, day_index, day, chunk, n).table


def _draw_chunk(cfg: SyntheticConfig, w: _World, day_index: int, day: str, chunk: int, n: int) -> _Chunk:
    """Draw one chunk from ``default_rng([seed, day_index, chunk])``. The draw order is part of the output
    (another order is another dataset): users, request times, behaviour sequence, funnel ranking, the
    deep positions of the negative groups, padding."""
    rng = np.random.default_rng([cfg.seed, day_index, chunk])
    users = rng.choice(len(w.user_vec), size=n, p=w.user_activity)
    ts = day_start_ms(day) + rng.integers(0, 86_400_000, n)
    uvec = w.user_vec[users]  # [n, LATENT]
    seq_feat, seq_mask = _behaviour_sequence(rng, cfg, w, uvec)
    groups = _candidate_groups(rng, cfg.mode, _funnel_ranking(rng, cfg, w, uvec))
    masks = _group_masks(rng, cfg, n)
    cols = _request_columns(w, day_index * 10**10 + chunk * cfg.rows_per_file, users, ts)
    cols["seq_items"] = _fsl(seq_feat, SEQ_LEN * len(SEQ_FIELDS))
    cols["seq_mask"] = _fsl(seq_mask, SEQ_LEN)
    for g, (items, label) in groups.items():
        cols.update(_group_columns(w, g, items, masks[g], label))
    table = pa.Table.from_pydict(cols, schema=arrow_schema(cfg.mode))
    return _Chunk(table, uvec, {g: items for g, (items, _) in groups.items()}, masks)


def _behaviour_sequence(rng: np.random.Generator, cfg: SyntheticConfig, w: _World,
                        uvec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The items each user liked most among a popularity-sampled pool (utility + Gumbel noise, best
    first), 5..50 of them, front-padded: (features ``[n, SEQ_LEN, 5]``, mask ``[n, SEQ_LEN]`` int8)."""
    n = len(uvec)
    pool = _sample_pool(rng, w.item_pop, n, POOL)
    keys = utility(cfg, w, uvec, pool) + rng.gumbel(size=pool.shape)
    items = np.take_along_axis(pool, np.argsort(-keys, axis=1)[:, :SEQ_LEN], axis=1)
    length = rng.integers(5, SEQ_LEN + 1, n)
    mask = (np.arange(SEQ_LEN)[None, :] >= SEQ_LEN - length[:, None]).astype(np.int8)
    return _item_features(w, items)[..., : len(SEQ_FIELDS)] * mask[..., None], mask


def _funnel_ranking(rng: np.random.Generator, cfg: SyntheticConfig, w: _World, uvec: np.ndarray) -> np.ndarray:
    """``[n, POOL]``: a popularity-sampled pool ordered by the simulated production funnel, best first
    (utility + ``funnel_noise`` * standard normal noise)."""
    pool = _sample_pool(rng, w.item_pop, len(uvec), POOL)
    funnel = utility(cfg, w, uvec, pool) + cfg.funnel_noise * rng.normal(size=pool.shape)
    return np.take_along_axis(pool, np.argsort(-funnel, axis=1), axis=1)


def _candidate_groups(rng: np.random.Generator, mode: str,
                      ranked: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Funnel positions -> ``(items [n, SLOTS], label [n, SLOTS] float32)`` per stored group, in
    ``stored_groups(mode)`` order. Positives are positions 0-9 graded ``30 - rank_index``; two-stage
    negatives: rank_neg 10-19 (grade 7), coarse_neg 10 of 20-99 (6), prerank_neg 10 of 100-199 (5);
    three-stage: rerank_neg 10-19 (8), rank_neg 20-29 (7), coarse_neg 10 of 30-99, prerank_neg as above."""
    n = ranked.shape[0]

    def deep(lo: int, hi: int) -> np.ndarray:  # 10 random funnel positions in [lo, hi) per request
        pos = lo + np.argsort(rng.random((n, hi - lo)), axis=1)[:, :SLOTS]
        return np.take_along_axis(ranked, np.sort(pos, axis=1), axis=1)

    def grade(value: float) -> np.ndarray:
        return np.full((n, SLOTS), value, dtype=np.float32)

    def span(lo: int) -> np.ndarray:
        return ranked[:, lo:lo + SLOTS]

    positive = (span(0), MAX_GRADE - np.broadcast_to(np.arange(1, SLOTS + 1, dtype=np.float32), (n, SLOTS)))
    if mode == "two_stage":
        negatives = {"rank_neg": (span(SLOTS), grade(7.0)), "coarse_neg": (deep(20, 100), grade(6.0))}
        groups = {"rank_pos": positive, **negatives}
    else:
        negatives = {"rerank_neg": (span(SLOTS), grade(8.0)), "rank_neg": (span(2 * SLOTS), grade(7.0)),
                     "coarse_neg": (deep(30, 100), grade(6.0))}
        groups = {"rerank_pos": positive, "rank_pos": positive, **negatives}
    groups["prerank_neg"] = (deep(100, POOL), grade(5.0))
    return {g: groups[g] for g in stored_groups(mode)}


def _group_masks(rng: np.random.Generator, cfg: SyntheticConfig, n: int) -> dict[str, np.ndarray]:
    """``[n, SLOTS]`` int8 masks per stored group: a positive group keeps at least 3 real candidates and
    rerank_pos / rank_pos share one padding (they describe the same items); a negative keeps at least 1."""
    shared = _pad_mask(rng, n, cfg.pad_prob, 3)
    return {g: shared if g in POSITIVE_GROUPS else _pad_mask(rng, n, cfg.pad_prob, 1)
            for g in stored_groups(cfg.mode)}


def _fsl(values: np.ndarray, width: int) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), width)


def _request_columns(w: _World, first_id: int, users: np.ndarray, ts: np.ndarray) -> dict[str, pa.Array]:
    """REQUEST_FIELDS columns: ids shifted +1 (0 = padding), time features in Asia/Shanghai."""
    wd, hr, mi = local_time_features(ts)
    return {
        "request_id": pa.array(first_id + np.arange(len(users), dtype=np.int64)),
        "user_id": pa.array(users + 1),
        "device_id": pa.array(w.user_device[users] + 1),
        "age": pa.array(w.user_age[users] + 1),
        "gender": pa.array(w.user_gender[users] + 1),
        "province": pa.array(w.user_province[users] + 1),
        "request_ts": pa.array(ts),
        "req_weekday": pa.array(wd + 1),
        "req_hour": pa.array(hr + 1),
        "req_minute": pa.array(mi + 1),
    }


def _group_columns(w: _World, g: str, items: np.ndarray, mask: np.ndarray, label: np.ndarray) -> dict:
    """``<g>_items`` / ``<g>_mask`` / ``<g>_label`` with zero features and label on padded slots."""
    feats = _item_features(w, items) * mask[..., None]
    return {f"{g}_items": _fsl(feats, SLOTS * len(ITEM_FIELDS)), f"{g}_mask": _fsl(mask, SLOTS),
            f"{g}_label": _fsl((label * mask).astype(np.float32), SLOTS)}


# ---------------------------------------------------------------------------------------------- reference


def reference_recalls(cfg: SyntheticConfig, w: _World, chunk: _Chunk) -> dict[str, oracle.RecallSums]:
    """Per cascade mode the data serves, the joint recall sums (see oracle.py) of ranking each request's
    valid logged candidates (``groups_for(mode)``, ground truth = its first group) by the noise-free
    ``utility`` (``oracle``), the affinity alone, the log-popularity alone, and at random."""
    out = {}
    for view in ("two_stage",) if cfg.mode == "two_stage" else ("two_stage", "three_stage"):
        groups = groups_for(view)
        items = np.concatenate([chunk.items[g] for g in groups], axis=1)
        valid = np.concatenate([chunk.masks[g] for g in groups], axis=1).astype(bool)
        gt = valid & (np.arange(valid.shape[1]) < SLOTS)[None, :]
        scores = {"oracle": utility(cfg, w, chunk.uvec, items), "affinity": _affinity(w, chunk.uvec, items),
                  "popularity": w.item_logpop[items]}
        out[view] = oracle.rank_all(scores, valid, gt)
    return out


# ---------------------------------------------------------------------------------------------- writing


def _write_chunk(cfg: SyntheticConfig, w: _World, day_index: int, day: str, chunk: int, n: int,
                 directory: str) -> tuple[int, dict[str, oracle.RecallSums]]:
    """Write one chunk as ``<directory>/part-<chunk>.parquet``; (requests, reference recall sums)."""
    drawn = _draw_chunk(cfg, w, day_index, day, chunk, n)
    path = Path(directory) / f"part-{chunk:05d}.parquet"
    try:
        pq.write_table(drawn.table, path)
    except OSError as exc:
        raise write_error(path, exc) from None
    return n, reference_recalls(cfg, w, drawn)


@dataclass
class _Written:
    """What the days' chunks report: requests and reference recall sums per day."""

    rows: dict[str, int] = field(default_factory=dict)
    recalls: dict[str, dict[str, oracle.RecallSums]] = field(default_factory=dict)

    def add(self, day: str, results: list[tuple[int, dict[str, oracle.RecallSums]]]) -> None:
        self.rows[day] = sum(n for n, _ in results)
        day_sums = self.recalls.setdefault(day, {})
        for _, sums in results:
            for view, s in sums.items():
                day_sums.setdefault(view, oracle.RecallSums()).add(s)


def _write_days(cfg: SyntheticConfig, w: _World, days: list[str], root: Path, parallel: bool) -> _Written:
    """Every day's chunks into ``<root>/day=D/``, sequentially or as Ray tasks (same files either way)."""
    jobs = {day: [(i, day, c, n) for c, n in enumerate(chunk_sizes(cfg))] for i, day in enumerate(days)}
    for day in days:
        day_dir(root, day).mkdir()
    def write(day: str) -> list:
        return [_write_chunk(cfg, w, *job, str(day_dir(root, day))) for job in jobs[day]]

    collect = _submit(cfg, w, jobs, root) if parallel else write
    written = _Written()
    for day in tqdm(days, desc="generate", unit="day", leave=False):
        written.add(day, collect(day))
        log.info("generated day %s: %d requests", day, written.rows[day])
    return written


def _submit(cfg: SyntheticConfig, w: _World, jobs: dict[str, list], root: Path):
    """Submit every chunk as a Ray task; returns ``wait(day)``, the day's chunk results. A failed chunk
    cancels the rest and raises its own error (a DataError naming the file)."""
    import ray

    ensure_ray()
    task = ray.remote(num_cpus=1)(_write_chunk)
    world = ray.put(w)
    refs = {day: [task.remote(cfg, world, *job, str(day_dir(root, day))) for job in day_jobs]
            for day, day_jobs in jobs.items()}

    def wait(day: str) -> list:
        try:
            return ray.get(refs[day])
        except Exception as exc:
            pending = [r for rs in refs.values() for r in rs]
            for r in pending:
                ray.cancel(r)
            ray.wait(pending, num_returns=len(pending), timeout=30)
            cause = getattr(exc, "cause", None)
            raise (cause if isinstance(cause, DataError) else exc) from None

    return wait


def _check(cfg: SyntheticConfig, root: Path, overwrite: bool) -> None:
    if cfg.days <= 0 or cfg.requests_per_day <= 0:
        raise DataError(f"generate: --days and --requests-per-day must be positive, got "
                        f"{cfg.days} and {cfg.requests_per_day}")
    if cfg.vocab.get("video_id", 0) < 2 * POOL:
        raise DataError(f"generate: vocab video_id must be at least {2 * POOL}, got {cfg.vocab.get('video_id')}")
    if root.exists() and not root.is_dir():
        raise DataError(f"output '{root}' exists and is not a directory")
    if root.is_dir() and any(root.iterdir()) and not overwrite:
        raise DataError(f"output directory '{root}' is not empty; pass --overwrite to replace it")


WORLD_KNOBS = ("popularity_skew", "preference_strength", "popularity_weight", "funnel_noise", "item_spread",
               "pad_prob")


def world_knobs(cfg: SyntheticConfig) -> dict[str, float]:
    """The difficulty knobs of ``cfg`` (what, with the vocabulary, tells one synthetic world from another)."""
    return {name: getattr(cfg, name) for name in WORLD_KNOBS}


def generate(cfg: SyntheticConfig, out: str | Path, overwrite: bool = False,
             parallel: bool | None = None) -> DatasetMeta:
    """Write ``cfg.days`` days of synthetic data under ``out``; returns the dataset metadata.

    ``extra.world`` records the difficulty knobs (:func:`world_knobs`); ``extra.oracle`` the joint recall
    of reference rankings of the logged candidates (the noise-free utility, affinity alone, popularity
    alone, random), per day and overall: see
    :func:`reference_recalls` and :func:`oracle.summary`. Each day is written as chunks of
    ``rows_per_file`` requests, one file each. The whole dataset is written beside ``out`` and swapped in
    only when complete (:func:`daywriter.replaced_when_complete`): a failure leaves ``out`` as it was, an
    existing dataset replaced by ``overwrite`` included, and names the path that could not be written.
    ``parallel`` (default: when Ray is already initialised or more than a million requests are asked for)
    writes the chunks as Ray tasks; the output is identical either way, since every chunk draws from its
    own seeded stream.
    """
    root = Path(out)
    _check(cfg, root, overwrite)
    if parallel is None:
        import ray

        parallel = ray.is_initialized() or cfg.days * cfg.requests_per_day > 1_000_000
    world = _build_world(cfg)
    days = day_range(cfg.start_day, cfg.days)
    with replaced_when_complete(root) as stage:
        written = _write_days(cfg, world, days, stage, parallel)
        meta = DatasetMeta(mode=cfg.mode, days=list(days), vocab=dict(cfg.vocab), rows_per_day=written.rows,
                           source="synthetic",
                           extra={"seed": cfg.seed, "requests_per_day": cfg.requests_per_day,
                                  "rows_per_file": cfg.rows_per_file, "world": world_knobs(cfg),
                                  "oracle": oracle.summary(written.recalls)})
        meta.write(stage)
    log.info("wrote %d days to %s", len(days), root)
    return meta
