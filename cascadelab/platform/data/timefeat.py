"""Time features in a pinned time zone (Asia/Shanghai), never the host's."""

from __future__ import annotations

import datetime as dt
import zoneinfo

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cascadelab.platform.data.schema import TIMEZONE


def local_time_features(ts_ms: np.ndarray, tz: str = TIMEZONE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``ts_ms: [n]`` epoch milliseconds -> (weekday 0=Mon..6, hour 0..23, minute 0..59) in ``tz``, int64."""
    arr = pa.array(np.asarray(ts_ms, dtype=np.int64), pa.timestamp("ms", tz=tz))
    return tuple(np.asarray(f(arr), dtype=np.int64) for f in (pc.day_of_week, pc.hour, pc.minute))


def day_start_ms(day: str, tz: str = TIMEZONE) -> int:
    """Epoch milliseconds of local midnight of ``day`` (YYYY-MM-DD) in ``tz``."""
    d = dt.date.fromisoformat(day)
    return int(dt.datetime(d.year, d.month, d.day, tzinfo=zoneinfo.ZoneInfo(tz)).timestamp() * 1000)


def day_range(start: str, days: int) -> list[str]:
    d0 = dt.date.fromisoformat(start)
    return [(d0 + dt.timedelta(days=i)).isoformat() for i in range(days)]
