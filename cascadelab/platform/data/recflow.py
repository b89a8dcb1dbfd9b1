"""Convert the public RecFlow release into the project's day-partitioned Parquet schema (see schema.py).

Input (the release layout, under ``<src>/`` or ``<src>/data/``)::

    all_stage/<day>.feather              one row per (request, candidate) of every funnel stage
    seq_effective_50_dict/<day>.pkl      {request_id: int array [50, 10]}, front-padded behaviours
    request_id_dict/<day>.pkl            {request_id: {stage: int array [n, 8]}}
    others/id_cnt.pkl                    {field: number of ids}

Output: one row per request of the day (the de-duplicated request rows of all_stage). Per request:

* request fields shifted +1 (0 = padding) and the request time features in Asia/Shanghai;
* the sequence: columns SEQ_FIELDS of the behaviour array, a row is real iff its request_ts column > 0;
  real rows are shifted +1 (category_level_one too), padded rows are all 0;
* each candidate group: the first SLOTS rows of ``request_id_dict[rid][group]`` mapped to ITEM_FIELDS;
  the positive groups are graded ``30 - rank_index`` (``rerank_index`` for rerank_pos), looked up by
  (request_id, video_id) among the all_stage rows flagged rank_pos == 1 (rerank_pos == 1); a candidate
  that the lookup misses is dropped from its slot (mask 0, zero features) and counted; the negative
  groups get constant grades; padded slots have mask 0, label 0 and zero features.

Memory: one day, one pickle and one chunk at a time. all_stage is streamed record batch by record batch
(only the needed columns are read). The behaviour dict is walked in chunks of requests into the sequence
columns, which are spilled to an Arrow IPC file beside the day's output, and freed before the candidate
dict is loaded; that dict is walked chunk by chunk too, and each chunk (request columns, its sequence
columns read back from the spill, its candidate columns) is appended to the day's Parquet files at once.
The behaviour dict is loaded whole with ``pickle.load`` (every row of it is used); the candidate dict,
whose stage arrays hold ~200 rows per request of which the converter reads 10 per stage, is loaded by
``slimpickle.load_trimmed``, which cuts every array to its first SLOTS rows while unpickling (and accepts
NumPy arrays only). The converted day is never held in memory; ``cascadelab bench convert`` measures the
peak and extrapolates it to a full day. Each day is written atomically (``daywriter.DayWriter``: a
temporary directory, then a rename) and ``dataset.json`` is rewritten after every finished day.

The pickles are unpickled: only convert a release from a source you trust.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import logging
import pickle
import re
import resource
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from cascadelab.platform.data.daywriter import DayWriter
from cascadelab.platform.data.schema import (
    ID_VOCAB_FIELDS,
    ITEM_FIELDS,
    MAX_GRADE,
    METADATA_FILE,
    SEQ_FIELDS,
    SEQ_LEN,
    SLOTS,
    DataError,
    DatasetMeta,
    arrow_schema,
    check_table_schema,
    day_dir,
    groups_for,
    stored_groups,
    write_error,
)
from cascadelab.platform.data.slimpickle import load_trimmed
from cascadelab.platform.data.timefeat import local_time_features

log = logging.getLogger(__name__)

SOURCE = "recflow"
CHUNK = 8192  # requests per numpy buffer
SLICE = 1 << 16  # all_stage rows handled at once (a release file may hold one huge record batch)
ROWS_PER_FILE = 32768
NEG_GRADES = {"rerank_neg": 8.0, "rank_neg": 7.0, "coarse_neg": 6.0, "prerank_neg": 5.0}
POS_INDEX = {"rank_pos": "rank_index", "rerank_pos": "rerank_index"}  # positive group -> index column

# all_stage columns (by name)
REQUEST_COLUMNS = ("request_id", "user_id", "request_timestamp", "device_id", "age", "gender", "province")
USER_COLUMNS = ("user_id", "device_id", "age", "gender", "province")
# request_id_dict arrays: 0 video_id, 1 author_id, 2 duration, 3 category_level_two, 4 upload_type,
# 5 upload_timestamp (s), 6 category_level_one, 7 effective_view
CAND_WIDTH = 8
CAND_ID_COLS = [0, 1, 3, 6, 4]  # -> SEQ_FIELDS order (the first five ITEM_FIELDS)
CAND_UPLOAD_TS = 5
# seq_effective_50_dict arrays: 0 video_id, 1 author_id, 2 category_level_two, 3 category_level_one,
# 4 upload_type, 5 upload_timestamp, 6 duration, 7 request_timestamp (ms), 8 playing_time, 9 request_id
SEQ_WIDTH = 8  # columns read (0..7)
SEQ_ID_COLS = [0, 1, 2, 3, 4]
SEQ_TS = 7

_DAY_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


# ---------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class RecFlowLayout:
    root: Path  # the directory holding all_stage/, request_id_dict/, ...

    def all_stage(self, day: str) -> Path:
        return self.root / "all_stage" / f"{day}.feather"

    def seq(self, day: str) -> Path:
        return self.root / "seq_effective_50_dict" / f"{day}.pkl"

    def requests(self, day: str) -> Path:
        return self.root / "request_id_dict" / f"{day}.pkl"

    @property
    def id_cnt(self) -> Path:
        return self.root / "others" / "id_cnt.pkl"

    def available_days(self) -> list[str]:
        return sorted(p.stem for p in (self.root / "all_stage").glob("*.feather") if _DAY_RE.match(p.stem))


def find_layout(src: str | Path) -> RecFlowLayout:
    """The release root: ``<src>`` itself or ``<src>/data`` (the reference loaders' layout)."""
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"RecFlow source '{src}' does not exist (expected the release directory with "
                        f"all_stage/, or its parent with data/all_stage/)")
    for cand in (src, src / "data"):
        if (cand / "all_stage").is_dir():
            return RecFlowLayout(cand)
    raise DataError(f"RecFlow source '{src}': no all_stage/ directory in '{src}' or '{src / 'data'}' "
                    f"(expected the release layout all_stage/<day>.feather, request_id_dict/<day>.pkl, ...)")


def check_day(day: str, what: str = "day") -> str:
    try:
        ok = bool(_DAY_RE.match(day)) and dt.date.fromisoformat(day).isoformat() == day
    except ValueError:
        ok = False
    if not ok:
        raise DataError(f"{what} '{day}': expected a date YYYY-MM-DD")
    return day


def select_days(layout: RecFlowLayout, days: list[str] | None = None, start: str | None = None,
                end: str | None = None) -> list[str]:
    """Explicit ``days``, or every calendar day from ``start`` to ``end`` (inclusive; an open bound is the
    first / last day present in all_stage/), or every day present in all_stage/."""
    if days is not None and (start or end):
        raise DataError("--days: give either --days or --start-day/--end-day, not both")
    if days is not None:
        days = [check_day(d.strip(), "--days") for d in days if d.strip()]
        if not days:
            raise DataError("--days: expected at least one day YYYY-MM-DD")
        return sorted(set(days))
    available = layout.available_days()
    if not (start or end):
        if not available:
            raise DataError(f"'{layout.root / 'all_stage'}': no <YYYY-MM-DD>.feather files")
        return available
    start = check_day(start, "--start-day") if start else (available[0] if available else None)
    end = check_day(end, "--end-day") if end else (available[-1] if available else None)
    if start is None or end is None:
        raise DataError(f"'{layout.root / 'all_stage'}': no <YYYY-MM-DD>.feather files")
    d0, d1 = dt.date.fromisoformat(start), dt.date.fromisoformat(end)
    if d1 < d0:
        raise DataError(f"--end-day '{end}' is before --start-day '{start}'")
    return [(d0 + dt.timedelta(days=i)).isoformat() for i in range((d1 - d0).days + 1)]


# ---------------------------------------------------------------------------------------------- inputs


def _load_pickle(path: Path, what: str, max_rows: int | None = None):
    """The pickled dict at ``path``; with ``max_rows``, loaded by ``slimpickle.load_trimmed`` (2-D arrays cut
    to their first ``max_rows`` rows while loading, NumPy globals only)."""
    if not path.is_file():
        raise DataError(f"'{path}' is missing: expected {what}")
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f) if max_rows is None else load_trimmed(f, max_rows)
    except DataError as exc:
        raise DataError(f"'{path}': {exc}; expected {what}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError,
            IndexError, KeyError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"'{path}': not a readable pickle ({msg}); expected {what}") from None
    if not isinstance(obj, dict):
        raise DataError(f"'{path}': holds a {type(obj).__name__}, expected {what}")
    return obj


def load_id_cnt(layout: RecFlowLayout) -> dict[str, int]:
    """``others/id_cnt.pkl`` with normalised keys (stripped; ``photo_id`` -> ``video_id``)."""
    raw = _load_pickle(layout.id_cnt, "a dict {field: number of ids}")
    out: dict[str, int] = {}
    for key, value in raw.items():
        name = str(key).strip()
        name = "video_id" if name == "photo_id" else name
        try:
            out[name] = max(out.get(name, 0), int(value))
        except (TypeError, ValueError):
            raise DataError(f"'{layout.id_cnt}': field '{key}' has value {value!r}, expected an integer") \
                from None
    return out


def _required_columns(mode: str) -> tuple[str, ...]:
    cols = REQUEST_COLUMNS + ("video_id",)
    for g in stored_groups(mode):
        if g in POS_INDEX:
            cols += (g, POS_INDEX[g])
    return cols


def _check_feather(path: Path, columns: tuple[str, ...]) -> bool:
    """Check that the Feather file exists and has ``columns`` with numeric types; returns whether it is a
    legacy Feather v1 file (read whole) rather than Feather v2 / Arrow IPC (read batch by batch)."""
    if not path.is_file():
        raise DataError(f"'{path}' is missing: expected the day's all_stage Feather file")
    try:
        schema, legacy = ipc.open_file(pa.memory_map(str(path))).schema, False
    except (pa.ArrowInvalid, OSError):
        try:
            schema, legacy = feather.read_table(str(path), columns=[]).schema, True
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"'{path}': not a readable Feather file ({str(exc).splitlines()[0]})") from None
    for c in columns:
        idx = schema.get_field_index(c)
        if idx < 0:
            raise DataError(f"'{path}': missing column '{c}' (expected the all_stage columns {list(columns)})")
        t = schema.field(idx).type
        if not (pa.types.is_integer(t) or pa.types.is_floating(t)):
            raise DataError(f"'{path}': column '{c}' has type {t}, expected an integer type")
    return legacy


def _feather_slices(path: Path, columns: tuple[str, ...]) -> Iterator[pa.RecordBatch]:
    """The file's ``columns``, at most SLICE rows at a time; an IPC file is read one record batch at a time."""
    if _check_feather(path, columns):
        batches: Iterable = feather.read_table(str(path), columns=list(columns)).to_batches()
    else:
        source = pa.memory_map(str(path))
        schema = ipc.open_file(source).schema
        opts = ipc.IpcReadOptions(included_fields=[schema.get_field_index(c) for c in columns])
        reader = ipc.open_file(source, options=opts)
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    for batch in batches:
        for off in range(0, batch.num_rows, SLICE):
            yield batch.slice(off, SLICE)


def _ints(batch: pa.RecordBatch, name: str, path: Path) -> np.ndarray:
    col = batch.column(name)
    if col.null_count:
        raise DataError(f"'{path}': column '{name}' has {col.null_count} null values, expected integers")
    return col.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)


@dataclass
class _Lookup:
    """(request position, video_id) -> (re)rank_index of one positive group, as one int64 key index."""

    keys: pd.Index
    index: np.ndarray
    width: int  # key = position * width + video_id

    def find(self, pos: np.ndarray, vid: np.ndarray) -> np.ndarray:
        """(re)rank_index of each query, NaN where the lookup misses."""
        key = np.where((vid >= 0) & (vid < self.width), pos * self.width + vid, -1)
        hit = self.keys.get_indexer(key)
        out = np.full(key.shape, np.nan)
        out[hit >= 0] = self.index[hit[hit >= 0]]
        return out


def read_all_stage(path: Path, mode: str) -> tuple[pd.DataFrame, dict[str, _Lookup], int]:
    """(unique request rows in order of first appearance, positive-group lookups, conflicting request rows
    dropped): streams the Feather file one record batch at a time."""
    columns = _required_columns(mode)
    pos_groups = [g for g in stored_groups(mode) if g in POS_INDEX]
    req_parts: list[pd.DataFrame] = []
    pos_parts: dict[str, list[tuple[np.ndarray, ...]]] = {g: [] for g in pos_groups}
    for b in _feather_slices(path, columns):
        req_parts.append(pd.DataFrame({c: _ints(b, c, path) for c in REQUEST_COLUMNS}).drop_duplicates())
        rid = _ints(b, "request_id", path)
        vid = _ints(b, "video_id", path)
        for g in pos_groups:
            flag = _ints(b, g, path) == 1
            if flag.any():
                idx = b.column(POS_INDEX[g]).to_numpy(zero_copy_only=False)[flag].astype(np.float64)
                pos_parts[g].append((rid[flag], vid[flag], idx))
    if req_parts:
        reqs = pd.concat(req_parts, ignore_index=True).drop_duplicates()
    else:
        reqs = pd.DataFrame({c: np.zeros(0, np.int64) for c in REQUEST_COLUMNS})
    del req_parts
    dup = reqs["request_id"].duplicated().to_numpy()
    conflicts = int(dup.sum())
    if conflicts:
        log.warning("'%s': %d request rows disagree with an earlier row of the same request_id; kept the "
                    "first", path, conflicts)
    reqs = reqs[~dup].reset_index(drop=True)
    positions = pd.Index(reqs["request_id"].to_numpy())
    lookups = {}
    for g in pos_groups:
        parts = pos_parts.pop(g)
        rid, vid, idx = (np.concatenate([p[i] for p in parts]) if parts else np.zeros(0) for i in range(3))
        rid, vid = rid.astype(np.int64), vid.astype(np.int64)
        pos = positions.get_indexer(rid)
        keep = (pos >= 0) & ~np.isnan(idx) & (vid >= 0)
        pos, vid, idx = pos[keep], vid[keep], idx[keep]
        width = int(vid.max()) + 1 if vid.size else 1
        if len(reqs) * width >= 2**62:
            raise DataError(f"'{path}': column 'video_id' has ids up to {width - 1}, too large to index")
        keys = pd.Index(pos.astype(np.int64) * width + vid)
        first = ~keys.duplicated()  # a (request, video) pair listed twice: keep its first index
        lookups[g] = _Lookup(keys[first], idx[first], width)
    return reqs, lookups, conflicts


# ---------------------------------------------------------------------------------------------- conversion


class _IdStats:
    """Largest raw id seen per vocabulary field; a negative id is an error (0 is padding after the shift)."""

    def __init__(self) -> None:
        self.max: dict[str, int] = {}

    def update(self, name: str, values: np.ndarray, path: Path) -> None:
        if values.size == 0:
            return
        lo, hi = int(values.min()), int(values.max())
        if lo < 0:
            raise DataError(f"'{path}': field '{name}' has id {lo}, expected ids >= 0")
        self.max[name] = max(self.max.get(name, -1), hi)


def _fsl(values: np.ndarray, schema: pa.Schema, name: str) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), type=schema.field(name).type)


def _sequence_chunks(seq_dict: dict, rids: list, path: Path, schema: pa.Schema, ids: _IdStats,
                     chunk: int) -> Iterator[tuple[pa.Array, pa.Array]]:
    """(seq_items, seq_mask) Arrow arrays for each chunk of ``rids``, in order."""
    for start in range(0, len(rids), chunk):
        part = rids[start:start + chunk]
        raw = np.zeros((len(part), SEQ_LEN, SEQ_WIDTH), np.int64)
        rid = None
        try:
            for j, rid in enumerate(part):
                s = seq_dict[rid]
                if s.ndim != 2 or s.shape[0] != SEQ_LEN or s.shape[1] < SEQ_WIDTH:
                    raise ValueError
                raw[j] = s[:, :SEQ_WIDTH]
        except KeyError:
            raise DataError(f"'{path}': request_id {rid} of the day's all_stage is not a key (expected "
                            f"every request of the day)") from None
        except (AttributeError, TypeError, ValueError, IndexError):
            raise DataError(f"'{path}': request_id {rid}: expected an integer array of shape "
                            f"[{SEQ_LEN}, >= {SEQ_WIDTH}]") from None
        mask = raw[:, :, SEQ_TS] > 0
        feats = raw[:, :, SEQ_ID_COLS]
        for k, name in enumerate(SEQ_FIELDS):
            ids.update(name, feats[:, :, k][mask], path)
        feats = (feats + 1) * mask[:, :, None]
        yield _fsl(feats, schema, "seq_items"), _fsl(mask.astype(np.int8), schema, "seq_mask")


def _group_arrays(g: str, raw: np.ndarray, count: np.ndarray, base: int, lookups: dict[str, _Lookup],
                  path: Path, ids: _IdStats) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Raw ``[c, SLOTS, 8]`` candidates -> (items ``[c, SLOTS, 8]``, mask, label, lookup misses)."""
    c = raw.shape[0]
    mask = np.arange(SLOTS)[None, :] < count[:, None]
    ids_raw = raw[:, :, CAND_ID_COLS]
    for k, name in enumerate(SEQ_FIELDS):
        ids.update(name, ids_raw[:, :, k][mask], path)
    items = np.empty((c, SLOTS, len(ITEM_FIELDS)), np.int64)
    items[:, :, :len(SEQ_FIELDS)] = ids_raw + 1
    wd, hr, mi = local_time_features(raw[:, :, CAND_UPLOAD_TS].reshape(-1) * 1000)
    for k, v in enumerate((wd, hr, mi)):
        items[:, :, len(SEQ_FIELDS) + k] = v.reshape(c, SLOTS) + 1
    label = np.zeros((c, SLOTS), np.float32)
    misses = 0
    if g in POS_INDEX:
        pos = np.broadcast_to(base + np.arange(c)[:, None], (c, SLOTS))
        index = lookups[g].find(pos[mask], raw[:, :, 0][mask])
        found = ~np.isnan(index)
        misses = int((~found).sum())
        sel = np.zeros_like(mask)
        sel[mask] = found
        label[sel] = MAX_GRADE - index[found]
        mask = sel
    else:
        label[mask] = NEG_GRADES[g]
    items *= mask[:, :, None]
    return items, mask.astype(np.int8), label, misses


def _candidate_chunks(req_dict: dict, rids: list, path: Path, schema: pa.Schema, groups: tuple[str, ...],
                      lookups: dict[str, _Lookup], ids: _IdStats, chunk: int,
                      misses: dict[str, int]) -> Iterator[dict[str, pa.Array]]:
    """The candidate-group columns of each chunk of ``rids``, in order; lookup misses added to ``misses``."""
    for start in range(0, len(rids), chunk):
        part = rids[start:start + chunk]
        raws = [np.zeros((len(part), SLOTS, CAND_WIDTH), np.int64) for _ in groups]
        counts = [np.zeros(len(part), np.int64) for _ in groups]
        spec = list(zip(groups, raws, counts, strict=True))
        rid = g = None
        try:
            for j, rid in enumerate(part):
                stages = req_dict[rid]
                for g, raw, cnt in spec:
                    a = stages.get(g)
                    if a is None:
                        continue
                    a = a[:SLOTS]
                    k = len(a)
                    if k:
                        if a.ndim != 2 or a.shape[1] < CAND_WIDTH:
                            raise ValueError
                        raw[j, :k] = a[:, :CAND_WIDTH]
                        cnt[j] = k
        except KeyError:
            raise DataError(f"'{path}': request_id {rid} of the day's all_stage is not a key (expected "
                            f"every request of the day)") from None
        except (AttributeError, TypeError, ValueError, IndexError):
            where = f"request_id {rid} stage '{g}'" if g else f"request_id {rid}"
            raise DataError(f"'{path}': {where}: expected a dict of integer arrays of shape "
                            f"[n, >= {CAND_WIDTH}]") from None
        cols = {}
        for g, raw, cnt in spec:
            items, mask, label, miss = _group_arrays(g, raw, cnt, start, lookups, path, ids)
            if g in misses:
                misses[g] += miss
            cols[f"{g}_items"] = _fsl(items, schema, f"{g}_items")
            cols[f"{g}_mask"] = _fsl(mask, schema, f"{g}_mask")
            cols[f"{g}_label"] = _fsl(label, schema, f"{g}_label")
        del raws, counts, spec
        yield cols


@dataclass
class DayResult:
    rows: int
    misses: dict[str, int]
    conflicts: int
    max_ids: dict[str, int]


SPILL_FILE = ".seq-spill.arrow"


def _release_memory() -> None:
    """Hand freed memory back to the OS between phases (Arrow's pool and glibc keep it otherwise), so that
    the next pickle does not stack on top of the previous phase's garbage.

    No ``gc.collect()``: a phase's pickles and frames hold no reference cycles, so reference counting has
    freed them by the time this runs; a full collection would only walk every live object."""
    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def convert_day(layout: RecFlowLayout, day: str, mode: str, writer: DayWriter, chunk: int = CHUNK) -> DayResult:
    """Stream one day of the release into ``writer`` (rows in ``arrow_schema(mode)``), chunk by chunk.

    Holds one pickle at a time plus one chunk: the sequence columns are spilled to an Arrow IPC file in
    the writer's temporary directory while the behaviour dict is loaded, then read back chunk by chunk
    beside the candidate dict; the caller commits the writer."""
    schema = arrow_schema(mode)
    ids = _IdStats()
    reqs, lookups, conflicts = read_all_stage(layout.all_stage(day), mode)
    rids = reqs["request_id"].tolist()
    req_cols = _request_columns(reqs, layout.all_stage(day), ids)
    del reqs
    _release_memory()
    spill = writer.tmp / SPILL_FILE
    _spill_sequences(layout.seq(day), rids, schema, ids, chunk, spill)
    _release_memory()
    req_path = layout.requests(day)
    req_dict = _load_pickle(req_path, "a dict {request_id: {stage: int array [n, 8]}}", max_rows=SLOTS)
    misses = {g: 0 for g in stored_groups(mode) if g in POS_INDEX}
    cands = _candidate_chunks(req_dict, rids, req_path, schema, stored_groups(mode), lookups, ids, chunk, misses)
    _write_rows(writer, schema, req_cols, spill, cands, chunk)
    spill.unlink()
    del req_dict, lookups, cands
    return DayResult(writer.rows, misses, conflicts, dict(ids.max))


def _request_columns(reqs: pd.DataFrame, path: Path, ids: _IdStats) -> dict[str, np.ndarray]:
    """The request columns of REQUEST_FIELDS: user fields shifted +1, time features in Asia/Shanghai."""
    cols: dict[str, np.ndarray] = {"request_id": reqs["request_id"].to_numpy()}
    for name in USER_COLUMNS:
        v = reqs[name].to_numpy()
        ids.update(name, v, path)
        cols[name] = v + 1
    ts = reqs["request_timestamp"].to_numpy()
    wd, hr, mi = local_time_features(ts)
    cols.update(request_ts=ts, req_weekday=wd + 1, req_hour=hr + 1, req_minute=mi + 1)
    return cols


def _spill_sequences(seq_path: Path, rids: list, schema: pa.Schema, ids: _IdStats, chunk: int,
                     spill: Path) -> None:
    """Load the behaviour dict and write its sequence columns, one record batch per chunk of ``rids``, to
    the Arrow IPC file ``spill``; the dict is freed on return."""
    seq_schema = pa.schema([schema.field("seq_items"), schema.field("seq_mask")])
    seq_dict = _load_pickle(seq_path, "a dict {request_id: int array [50, 10]}")
    try:
        with ipc.new_file(str(spill), seq_schema) as sink:
            for items, mask in _sequence_chunks(seq_dict, rids, seq_path, schema, ids, chunk):
                sink.write_batch(pa.record_batch([items, mask], schema=seq_schema))
    except OSError as exc:
        raise write_error(spill, exc) from None


def _write_rows(writer: DayWriter, schema: pa.Schema, req_cols: dict[str, np.ndarray], spill: Path,
                cands: Iterator[dict[str, pa.Array]], chunk: int) -> None:
    """Append each chunk's rows to ``writer``: its request columns, its sequence batch read back from
    ``spill`` and its candidate columns from ``cands``."""
    with pa.OSFile(str(spill)) as f:  # plain reads (not a memory map): each chunk's buffers are freed
        reader = ipc.open_file(f)
        for i, cand in enumerate(cands):
            start = i * chunk
            seq_batch = reader.get_batch(i)
            n = seq_batch.num_rows
            cols = {name: pa.array(v[start:start + n]) for name, v in req_cols.items()}
            cols.update(seq_items=seq_batch.column(0), seq_mask=seq_batch.column(1), **cand)
            writer.write(pa.Table.from_pydict({fld.name: cols[fld.name] for fld in schema}, schema=schema))


# ---------------------------------------------------------------------------------------------- driver


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _complete_rows(out: Path, day: str, mode: str, meta: DatasetMeta | None) -> int | None:
    """Rows of an already converted day, or None when it must be (re)converted: the day is complete when
    ``dataset.json`` lists it and its directory holds Parquet files of the full schema with that many rows."""
    if meta is None or day not in meta.rows_per_day:
        return None
    files = sorted(day_dir(out, day).glob("*.parquet"))
    if not files:
        return None
    rows = 0
    try:
        for f in files:
            pf = pq.ParquetFile(f)
            check_table_schema(pf.schema_arrow, arrow_schema(mode), f)
            rows += pf.metadata.num_rows
    except (DataError, pa.ArrowInvalid, OSError) as exc:
        log.warning("day %s in '%s' is incomplete (%s); converting it again", day, out, exc)
        return None
    return rows if rows == meta.rows_per_day[day] else None


def _existing_meta(out: Path, mode: str) -> DatasetMeta | None:
    if not (out / METADATA_FILE).is_file():
        return None
    meta = DatasetMeta.read(out)
    if meta.source != SOURCE:
        raise DataError(f"'{out / METADATA_FILE}': source '{meta.source}', expected '{SOURCE}'; "
                        f"choose another --out")
    if meta.mode != mode:
        raise DataError(f"'{out / METADATA_FILE}': mode '{meta.mode}', expected '{mode}'; "
                        f"choose another --out")
    return meta


def _vocab(id_cnt: dict[str, int], max_ids: dict[str, int], prev: dict[str, int]) -> dict[str, int]:
    return {f: max(id_cnt.get(f, 0), max_ids.get(f, -1) + 1, prev.get(f, 0)) for f in ID_VOCAB_FIELDS}


def _check_inputs(layout: RecFlowLayout, days: list[str], mode: str) -> None:
    """Fail before converting anything when a day's file is absent or all_stage lacks a column."""
    columns = _required_columns(mode)
    for day in days:
        _check_feather(layout.all_stage(day), columns)
        for p, what in ((layout.seq(day), "the day's seq_effective_50_dict pickle"),
                        (layout.requests(day), "the day's request_id_dict pickle")):
            if not p.is_file():
                raise DataError(f"'{p}' is missing: expected {what}")


def _open_output(root: Path, mode: str, layout: RecFlowLayout,
                 id_cnt: dict[str, int]) -> tuple[DatasetMeta | None, DatasetMeta]:
    """(the output's previous metadata or None, the metadata to extend): the output directory created,
    a dataset of another source or mode refused."""
    if root.exists() and not root.is_dir():
        raise DataError(f"output '{root}' exists and is not a directory")
    prev = _existing_meta(root, mode) if root.is_dir() else None
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(root, exc) from None
    meta = prev or DatasetMeta(mode=mode, source=SOURCE)
    meta.extra.update(src=str(layout.root), id_cnt=id_cnt)
    meta.extra.setdefault("lookup_misses", {})
    meta.extra.setdefault("duplicate_request_rows", {})
    meta.vocab = _vocab(id_cnt, {}, meta.vocab)
    return prev, meta


def _record_day(meta: DatasetMeta, day: str, res: DayResult, id_cnt: dict[str, int], mode: str) -> None:
    """Add a committed day to ``meta``: its rows, the vocabulary grown to its ids, its lookup misses."""
    meta.days = sorted(set(meta.days) | {day})
    meta.rows_per_day = dict(sorted({**meta.rows_per_day, day: res.rows}.items()))
    meta.vocab = _vocab(id_cnt, res.max_ids, meta.vocab)
    extra = meta.extra
    extra["lookup_misses"][day] = res.misses
    extra["duplicate_request_rows"][day] = res.conflicts
    extra["lookup_misses_total"] = {g: sum(m.get(g, 0) for m in extra["lookup_misses"].values())
                                    for g in stored_groups(mode) if g in POS_INDEX}


def convert_recflow(src: str | Path, out: str | Path, days: list[str] | None = None, mode: str = "two_stage",
                    force: bool = False, rows_per_file: int = ROWS_PER_FILE, chunk: int = CHUNK) -> DatasetMeta:
    """Convert ``days`` (default: every day in all_stage/) of the RecFlow release under ``src`` into the
    project's Parquet dataset at ``out``; returns its metadata. Days already converted are skipped unless
    ``force``. Each day is committed atomically (``DayWriter``) and then recorded in ``dataset.json``: a
    failing day (bad input, a full disk) raises DataError naming the path and leaves ``out`` as it was
    after the previous day, a previous version of the failing day included."""
    groups_for(mode)  # validates the mode
    layout = find_layout(src)
    days = select_days(layout, days)
    id_cnt = load_id_cnt(layout)
    missing = [f for f in ID_VOCAB_FIELDS if f not in id_cnt]
    if missing:
        log.warning("'%s' has no count for %s; their vocabulary comes from the ids seen", layout.id_cnt, missing)
    _check_inputs(layout, days, mode)
    root = Path(out)
    prev, meta = _open_output(root, mode, layout, id_cnt)
    t_all = time.perf_counter()
    for day in tqdm(days, desc="convert recflow", unit="day", leave=False):
        rows = None if force else _complete_rows(root, day, mode, prev)
        if rows is not None:
            log.info("day %s already converted (%d requests) in '%s'; skipped (pass --force to rewrite)",
                     day, rows, day_dir(root, day))
            continue
        t0 = time.perf_counter()
        with DayWriter(root, day, arrow_schema(mode), rows_per_file) as writer:
            res = convert_day(layout, day, mode, writer, chunk)
            res.rows = writer.commit()
        _record_day(meta, day, res, id_cnt, mode)
        meta.write(root)
        if any(res.misses.values()):
            log.warning("day %s: %s positive candidates not found among the all_stage rows of their group; "
                        "their slots are masked out", day, res.misses)
        log.info("converted %s: %d requests to '%s' in %.1fs, peak RSS %.0f MiB", day, res.rows,
                 day_dir(root, day), time.perf_counter() - t0, peak_rss_mib())
    meta.write(root)
    log.info("RecFlow -> '%s': %d days (%s) in %.1fs, peak RSS %.0f MiB", root, len(meta.days), mode,
             time.perf_counter() - t_all, peak_rss_mib())
    return meta
