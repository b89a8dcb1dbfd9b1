"""The project's RecFlow Parquet schema: one row per request, one directory per day.

Layout of a dataset directory::

    <root>/dataset.json                 metadata: schema version, mode, days, vocabulary sizes
    <root>/day=YYYY-MM-DD/part-*.parquet

Columns (all fixed-size lists, so that a batch reshapes to ``[B, slots, fields]`` without a copy):

* request fields, int64: request_id, user_id, device_id, age, gender, province, request_ts (ms since
  the epoch), req_weekday, req_hour, req_minute (computed in Asia/Shanghai, never the host's zone).
* ``seq_items``: ``fixed_size_list<int64>[50 * 5]``, the 50 latest behaviours, fields SEQ_FIELDS;
  ``seq_mask``: ``fixed_size_list<int8>[50]`` (1 = a real behaviour).
* per candidate group g (GROUPS_TWO_STAGE, or GROUPS_THREE_STAGE for three-stage data):
  ``g_items``: ``fixed_size_list<int64>[10 * 8]`` with ITEM_FIELDS, ``g_mask``: ``fixed_size_list<int8>[10]``,
  ``g_label``: ``fixed_size_list<float32>[10]`` graded label, higher = better (30 - rank_index for the
  positive group; 7 / 6 / 5 (and 8 for rerank_neg) for the negative groups; 0 on padded slots).

Id convention: every id is shifted so that 0 means padding (also category_level_one, unlike RecFlow's
padding_idx 2 in the LCRON reference ``models.py``); vocabulary sizes in the metadata count real ids,
so an embedding table needs ``vocab + 1`` rows.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cascadelab.cascade.batch import ITEM_FIELDS, SEQ_FIELDS, TIME_VOCAB
from cascadelab.cascade.batch import USER_FIELDS as USER_FIELDS  # re-exported for the data modules

SCHEMA_VERSION = 1
SEQ_LEN = 50
SLOTS = 10  # candidates per group
MAX_GRADE = 30.0  # label of a positive candidate = MAX_GRADE - its (re)rank_index (1..10)
TIMEZONE = "Asia/Shanghai"
METADATA_FILE = "dataset.json"

# The feature fields (SEQ_FIELDS, ITEM_FIELDS, USER_FIELDS: the features the models embed) and the time
# vocabularies TIME_VOCAB are defined once, in cascadelab.cascade.batch; the columns store them in that order.
REQUEST_FIELDS = ("request_id", "user_id", "device_id", "age", "gender", "province",
                  "request_ts", "req_weekday", "req_hour", "req_minute")  # request_id, request_ts: bookkeeping

GROUPS_TWO_STAGE = ("rank_pos", "rank_neg", "coarse_neg", "prerank_neg")
GROUPS_THREE_STAGE = ("rerank_pos", "rerank_neg", "rank_neg", "coarse_neg", "prerank_neg")
ALL_GROUPS = ("rerank_pos", "rerank_neg", "rank_pos", "rank_neg", "coarse_neg", "prerank_neg")

# Vocabularies a dataset must declare in its metadata.
ID_VOCAB_FIELDS = ("user_id", "device_id", "age", "gender", "province",
                   "video_id", "author_id", "category_level_two", "category_level_one", "upload_type")


class DataError(ValueError):
    """Bad data or a bad dataset path: the message names the path or field and what was expected."""


def write_error(path: str | Path, exc: OSError) -> DataError:
    """A failed write (a full disk, a lost mount, a permission) as one line naming the file and the reason."""
    reason = exc.strerror or (str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return DataError(f"'{exc.filename or path}': could not be written ({reason})")


def groups_for(mode: str) -> tuple[str, ...]:
    if mode == "two_stage":
        return GROUPS_TWO_STAGE
    if mode == "three_stage":
        return GROUPS_THREE_STAGE
    raise DataError(f"dataset mode '{mode}': expected two_stage or three_stage")


def stored_groups(mode: str) -> tuple[str, ...]:
    """Groups a dataset of this mode stores (three-stage data also keeps rank_pos for two-stage use)."""
    return GROUPS_TWO_STAGE if mode == "two_stage" else ALL_GROUPS


def arrow_schema(mode: str = "two_stage") -> pa.Schema:
    fields = [pa.field(name, pa.int64(), nullable=False) for name in REQUEST_FIELDS]
    fields.append(pa.field("seq_items", pa.list_(pa.int64(), SEQ_LEN * len(SEQ_FIELDS)), nullable=False))
    fields.append(pa.field("seq_mask", pa.list_(pa.int8(), SEQ_LEN), nullable=False))
    for g in stored_groups(mode):
        fields.append(pa.field(f"{g}_items", pa.list_(pa.int64(), SLOTS * len(ITEM_FIELDS)), nullable=False))
        fields.append(pa.field(f"{g}_mask", pa.list_(pa.int8(), SLOTS), nullable=False))
        fields.append(pa.field(f"{g}_label", pa.list_(pa.float32(), SLOTS), nullable=False))
    return pa.schema(fields)


def columns_for(groups: tuple[str, ...]) -> list[str]:
    """Columns a two- or three-stage training run reads (column projection for Ray Data)."""
    cols = [f for f in REQUEST_FIELDS if f != "request_ts"] + ["seq_items", "seq_mask"]
    for g in groups:
        cols += [f"{g}_items", f"{g}_mask", f"{g}_label"]
    return cols


def projected_schema(mode: str, groups: tuple[str, ...]) -> pa.Schema:
    """The schema of the columns a run over ``groups`` reads from a dataset of ``mode``."""
    full = arrow_schema(mode)
    return pa.schema([full.field(c) for c in columns_for(groups)])


@dataclass
class DatasetMeta:
    """Contents of ``dataset.json``: what a reader needs before opening any Parquet file."""

    mode: str = "two_stage"
    days: list[str] = field(default_factory=list)
    vocab: dict[str, int] = field(default_factory=dict)  # real ids per field; tables need vocab + 1 rows
    rows_per_day: dict[str, int] = field(default_factory=dict)
    source: str = "synthetic"
    schema_version: int = SCHEMA_VERSION
    timezone: str = TIMEZONE
    extra: dict = field(default_factory=dict)

    def write(self, root: Path) -> None:
        """Replace ``<root>/dataset.json`` atomically (a temporary file, then a rename); on a failed write
        the previous file stays and the DataError names the path."""
        path = Path(root) / METADATA_FILE
        tmp = path.with_name(METADATA_FILE + ".tmp")
        try:
            tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True))
            tmp.replace(path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise write_error(path, exc) from None

    @classmethod
    def read(cls, root: str | Path) -> DatasetMeta:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"data directory '{root}' does not exist; create one with "
                            f"`cascadelab generate --out {root}`")
        path = root / METADATA_FILE
        if not path.is_file():
            raise DataError(f"'{path}' is missing: '{root}' is not a cascadelab dataset "
                            f"(expected {METADATA_FILE} beside the day=YYYY-MM-DD directories)")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"'{path}': not valid JSON ({exc.msg} at line {exc.lineno})") from None
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(raw) - known
        if unknown:
            raise DataError(f"'{path}': unknown field(s) {sorted(unknown)}; expected {sorted(known)}")
        meta = cls(**raw)
        if meta.schema_version != SCHEMA_VERSION:
            raise DataError(f"'{path}': schema_version {meta.schema_version}, expected {SCHEMA_VERSION}")
        groups_for(meta.mode)
        missing = [f for f in ID_VOCAB_FIELDS if f not in meta.vocab]
        if missing:
            raise DataError(f"'{path}': field 'vocab' lacks {missing}")
        return meta


def id_high(vocab: dict[str, int], name: str) -> int:
    """Largest valid stored id of a field (ids are 1..V after the +1 shift, 0 = padding)."""
    return TIME_VOCAB.get(name, vocab.get(name, 0))


def id_range_error(where: str, name: str, value: int, high: int) -> DataError:
    return DataError(f"{where}: field '{name}' has id {value} outside the vocabulary "
                     f"(expected 0..{high}; see 'vocab' in {METADATA_FILE})")


def label_error(where: str, name: str) -> DataError:
    return DataError(f"{where}: field '{name}' holds NaN or inf (expected finite graded labels)")


def day_dir(root: str | Path, day: str) -> Path:
    return Path(root) / f"day={day}"


def day_dir_files(root: str | Path, day: str) -> list[str]:
    """The day's ``*.parquet`` files, sorted; DataError when the day's directory is missing or empty."""
    d = day_dir(root, day)
    if not d.is_dir():
        raise DataError(f"day '{day}': directory '{d}' does not exist")
    files = sorted(str(p) for p in d.glob("*.parquet"))
    if not files:
        raise DataError(f"day '{day}': no *.parquet files in '{d}'")
    return files


def same_type(got: pa.DataType, expected: pa.DataType) -> bool:
    """Type equality that ignores the child field name of list types ("item" vs "element")."""
    if pa.types.is_fixed_size_list(expected):
        return (pa.types.is_fixed_size_list(got) and got.list_size == expected.list_size
                and got.value_type == expected.value_type)
    return got == expected


def check_table_schema(table_schema: pa.Schema, expected: pa.Schema, path: str | Path) -> None:
    """Raise DataError naming the file and the first mismatching column (missing, wrong type/length)."""
    for f in expected:
        idx = table_schema.get_field_index(f.name)
        if idx < 0:
            raise DataError(f"'{path}': missing column '{f.name}' (expected {f.type})")
        got = table_schema.field(idx).type
        if not same_type(got, f.type):
            raise DataError(f"'{path}': column '{f.name}' has type {got}, expected {f.type}")


def day_files(root: str | Path, day: str, mode: str, groups: tuple[str, ...]) -> list[str]:
    """The day's Parquet files after checking each file's schema for the columns a run reads."""
    files = day_dir_files(root, day)
    expected = projected_schema(mode, groups)
    for path in files:
        try:
            got = pq.read_schema(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"'{path}': not a readable Parquet file ({str(exc).splitlines()[0]})") from None
        check_table_schema(got, expected, path)
    return files
