"""Hourly aggregates of the readings (the MASH apps' ``historical_aggregates``, CONTRACT §8),
kept in the store so they are exact and survive crashes and outages.

Readings are added into their (room, UTC hour) row as they pass a progress marker
(``aggregates_progress``, a reading id): an id-range scan, one transaction per chunk, sums
and marker together, so a crash repeats nothing and loses nothing. Readings held for the
clock are not added until they are rebased (and then land in their true hour). An hour is
owed to Firebase while the count last written differs from its count: the per-hour
progress marker. Retention deleting old readings never changes a row: the history stays.
"""
from __future__ import annotations

import datetime as dt
from fractions import Fraction

from mash.clock import to_epoch

PROGRESS = "aggregates_progress"
SCALE = 10_000      # sums are integers in 1/SCALE of the unit (values have at most 4 decimals)

_ADD = """
INSERT INTO hour_aggregates (room, hour, count, sum_temp, min_temp, max_temp, sum_hum, min_hum,
                             max_hum, sum_co2, min_co2, max_co2, first_ts, last_ts, written)
SELECT room, substr(timestamp, 1, 13), COUNT(*), SUM(CAST(round(temperature * 10000) AS INTEGER)),
       MIN(temperature), MAX(temperature), SUM(CAST(round(humidity * 10000) AS INTEGER)),
       MIN(humidity), MAX(humidity), SUM(CAST(round(co2 * 10000) AS INTEGER)), MIN(co2),
       MAX(co2), MIN(timestamp), MAX(timestamp), 0
FROM sensor_data WHERE id > ? AND id <= ? {simulated}
GROUP BY room, substr(timestamp, 1, 13)
ON CONFLICT (room, hour) DO UPDATE SET
  count = count + excluded.count,
  sum_temp = sum_temp + excluded.sum_temp, min_temp = MIN(min_temp, excluded.min_temp),
  max_temp = MAX(max_temp, excluded.max_temp),
  sum_hum = sum_hum + excluded.sum_hum, min_hum = MIN(min_hum, excluded.min_hum),
  max_hum = MAX(max_hum, excluded.max_hum),
  sum_co2 = sum_co2 + excluded.sum_co2, min_co2 = MIN(min_co2, excluded.min_co2),
  max_co2 = MAX(max_co2, excluded.max_co2),
  first_ts = MIN(first_ts, excluded.first_ts), last_ts = MAX(last_ts, excluded.last_ts)
"""


def progress(store) -> int:
    return store.meta_get(PROGRESS, 0) or 0


def behind(store) -> bool:
    """Readings not yet added (a read, no write)."""
    return _limit(store) > progress(store)


def _limit(store) -> int:
    last = store.last_reading_id()
    hold = store.clock_hold()
    return last if hold is None else min(last, hold - 1)


def accumulate(store, chunk: int = 10_000, include_simulated: bool = False) -> int:
    """Add every reading past the marker (up to the clock hold) into its hour, ``chunk``
    ids per transaction; returns how many ids were passed. Readings of the simulated board
    are left out unless ``include_simulated`` (SIM_SYNC)."""
    upto = _limit(store)
    sql = _ADD.format(simulated="" if include_simulated else "AND simulated = 0")
    start = done = progress(store)
    while done < upto:
        end = min(done + chunk, upto)
        with store.transaction():
            if progress(store) != done:        # another process moved it: start again from it
                done = progress(store)
                continue
            store.db.execute_sql(sql, (done, end))
            store.meta_set(PROGRESS, end)
        done = end
    return done - start


def owed(store, limit: int = 100) -> list:
    """Hours whose last written count is not their count, oldest first."""
    H = store.m.HourAggregate
    return list(H.select().where(H.written != H.count).order_by(H.hour, H.room).limit(limit))


def mark_written(store, rows) -> None:
    """Record the count each row had when it was written (a newer count stays owed)."""
    H = store.m.HourAggregate
    with store.transaction():
        for r in rows:
            H.update(written=r.count).where((H.room == r.room) & (H.hour == r.hour)).execute()


def hour_start(row) -> dt.datetime:
    return dt.datetime.strptime(row.hour, "%Y-%m-%d %H")


def _ts(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    return to_epoch(value)


def value(row) -> dict:
    """The apps' aggregate object: values rounded to 2 decimals, ``null`` with no sample. The
    mean is exact (integer sums), rounded half to even: no float noise decides a tie."""
    n = row.count

    def avg(total):
        return float(round(Fraction(total, n * SCALE), 2)) if n else None

    def r(x):
        return None if x is None or not n else round(x, 2)
    return {"avg_temp": avg(row.sum_temp), "min_temp": r(row.min_temp), "max_temp": r(row.max_temp),
            "avg_hum": avg(row.sum_hum), "min_hum": r(row.min_hum), "max_hum": r(row.max_hum),
            "avg_co2": avg(row.sum_co2), "min_co2": r(row.min_co2), "max_co2": r(row.max_co2),
            "sample_count": n, "first_ts": _ts(row.first_ts), "last_ts": _ts(row.last_ts)}


__all__ = ["accumulate", "owed", "mark_written", "value", "hour_start", "behind"]
