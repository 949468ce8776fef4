"""What the page shows, read from the store: each room's latest reading, downsampled chart
series, the cloud status, alerts, relays and the grower's own recent commands.

Every query here is a read that stays cheap with a million readings: the newest rows by
descending id, a chart window found by bisecting ids (rowids rise with time) and aggregated
in SQL to at most ``MAX_POINTS`` buckets, the backlog from the backend's progress marker.
"""
from __future__ import annotations

import datetime as dt
import json
import threading
import time

from mash import health
from mash.clock import as_datetime, iso, utcnow
from mash.config import Settings
from mash.contract import ROOMS
from mash.control import effective_modes
from mash.models import Store
from mash.models.stats import sink_states
from mash.rules import merge_thresholds

MAX_POINTS = 1000
METRICS = {"temperature": ("Temperature", "°C", "temp_min", "temp_max"),
           "humidity": ("Humidity", "%", "humidity_min", "humidity_max"),
           "co2": ("CO₂", "ppm", None, "co2_max")}


def thresholds(settings: Settings, store: Store) -> dict:
    """The alert limits in force: settings, then what CONFIGURE (or this page) set."""
    configured = (store.meta_get("configuration") or {}).get("thresholds")
    if not configured:
        return settings.thresholds
    try:
        return merge_thresholds(settings.thresholds, configured, "CONFIGURE")
    except Exception:                  # the reader logs a bad one; the page shows the base
        return settings.thresholds


def latest(store: Store, now: dt.datetime) -> dict:
    S = store.m.SensorData
    rooms = {}
    for room in ROOMS:
        row = (S.select(S.temperature, S.humidity, S.co2, S.timestamp, S.mono)
               .where(S.room == room).order_by(S.id.desc()).limit(1).first())
        if row is None:
            rooms[room] = None
            continue
        rooms[room] = {"temperature": row.temperature, "humidity": row.humidity, "co2": row.co2,
                       "timestamp": iso(row.timestamp),
                       "age_s": round((now - row.timestamp).total_seconds(), 1),
                       "clock_held": row.mono is not None}
    return rooms


def first_id_since(store: Store, since: dt.datetime) -> int | None:
    """An id such that the readings from it on are those stored at or after ``since``
    (bisection over ids, each probe one rowid lookup); None when there are none."""
    S = store.m.SensorData
    lo = S.select(S.id).order_by(S.id).limit(1).scalar()
    top = S.select(S.id).order_by(S.id.desc()).limit(1).scalar()
    if lo is None:
        return None
    hi = top + 1
    while lo < hi:
        mid = (lo + hi) // 2
        row = S.select(S.id, S.timestamp).where(S.id >= mid).order_by(S.id).limit(1).first()
        if row is None or row.timestamp >= since:
            hi = mid
        else:
            lo = row.id + 1
    return lo if lo <= top else None


def series(store: Store, room: str, hours: float, now: dt.datetime | None = None) -> list[dict]:
    """Averages per bucket (at most MAX_POINTS) over the last ``hours``, oldest first.

    Buckets are ranges of row ids, not of time: ids rise with time, and integer division on
    the rowid costs nothing per row where parsing each timestamp would (a week is 240,000
    rows). Each point carries the first timestamp of its bucket."""
    now = now or utcnow()
    since = now - dt.timedelta(hours=hours)
    first = first_id_since(store, since)
    if first is None:
        return []
    last = store.last_reading_id()
    step = max(1, (last - first + 1) // MAX_POINTS + 1)
    # Past two days a bucket holds a hundred readings or more: every other one is averaged
    # (a line's two rooms have neighbouring ids, so each room keeps half its readings), and
    # the rowid test skips the other half without decoding them.
    sample = " AND id % 4 < 2" if hours > 48 else ""
    cursor = store.db.execute_sql(
        "SELECT (id - ?) / ? AS b, AVG(temperature), AVG(humidity), AVG(co2), MIN(timestamp)"
        f" FROM sensor_data WHERE id >= ?{sample} AND room = ? GROUP BY b ORDER BY b",
        (first, step, first, room))
    return [{"t": as_datetime(ts), "temperature": t, "humidity": h, "co2": c}
            for (_, t, h, c, ts) in cursor.fetchall() if as_datetime(ts) >= since]


class SeriesCache:
    """One series per room and window, shared by its three charts (temperature, humidity,
    CO2) and kept a while: a 7-day window moves by a point every ten minutes, so aggregating
    a quarter of a million rows for every image, on every page load, would be waste."""
    TTL = {24.0: 5.0, 168.0: 60.0}

    def __init__(self):
        self._lock = threading.Lock()
        self._cache: dict = {}

    def get(self, store: Store, room: str, hours: float) -> tuple[dt.datetime, list[dict]]:
        """``(end of the window, points)``."""
        with self._lock:
            hit = self._cache.get((room, hours))
            if hit and time.monotonic() - hit[0] < self.TTL.get(hours, 5.0):
                return hit[1], hit[2]
            end = utcnow()
            points = series(store, room, hours, end)
            self._cache[(room, hours)] = (time.monotonic(), end, points)
            return end, points


def alerts(store: Store, cleared_limit: int = 50) -> dict:
    """Active alerts (raised, not cleared since) and the last cleared ones, newest first."""
    A = store.m.Alert
    rows = list(A.select().order_by(A.id.desc()).limit(2000))
    active, seen, cleared = [], set(), []
    for a in rows:
        key = (a.event_type, a.room)
        if key not in seen:
            seen.add(key)
            if a.state == "raised":
                active.append(a)
        if a.state == "cleared" and len(cleared) < cleared_limit:
            cleared.append(a)

    def shown(a):
        return {"type": a.event_type, "severity": a.severity, "room": a.room, "message": a.message,
                "value": a.value, "threshold": a.threshold, "at": iso(a.created_at)}
    return {"active": [shown(a) for a in active], "cleared": [shown(a) for a in cleared]}


def local_commands(store: Store, limit: int = 10) -> list[dict]:
    """The grower's own recent commands from this page or the shell, newest first."""
    C = store.m.Command
    rows = C.select().where(C.source == "local").order_by(C.seq.desc()).limit(limit)
    return [{"id": c.command_id, "command": c.command, "parameters": json.loads(c.parameters or "{}"),
             "status": c.status, "reason": c.reason, "at": iso(c.received_at)} for c in rows]


def cloud(settings: Settings, store: Store, now: dt.datetime) -> dict:
    """The guide's cloud status, cheaply: per sink online / offline / off, the backlog."""
    procs = store.processes()
    worker_alive = bool((procs.get("worker") or {}).get("alive"))
    S = store.m.SensorData
    progress = store.backend_progress()
    oldest = (S.select(S.timestamp).where((S.id > progress) & (S.synced == 0))
              .order_by(S.id).limit(1).scalar())
    last_id = store.last_reading_id()
    fb = store.sink("firebase")
    backend_row = store.sink("backend")
    return {
        "sinks": sink_states(store, settings, procs),
        "worker_alive": worker_alive,
        "reader_alive": bool((procs.get("reader") or {}).get("alive")),
        "board": (procs.get("reader") or {}).get("board"),
        "last_sync": iso(backend_row.last_ok) if backend_row.last_ok else None,
        "pending": store.pending_count(),
        "oldest_pending_age_s": round((now - oldest).total_seconds(), 1) if oldest else 0,
        "lag": {"backend": max(0, last_id - progress) if settings.backend_enabled else None,
                "firebase": max(0, last_id - (fb.progress or 0)) if settings.firebase_enabled else None},
        "clock_held": (last_id - store.clock_hold() + 1) if store.clock_hold() else 0,
    }


STARTED = time.time()                       # the dashboard's own uptime
_throttled: list = [None, float("-inf")]     # vcgencmd's answer and when: asked once a minute


def gateway_health(settings: Settings) -> dict:
    """``mash.health.snapshot`` for the page (vcgencmd asked at most once a minute)."""
    if time.monotonic() - _throttled[1] > 60:
        _throttled[:] = [health.throttled(), time.monotonic()]
    return health.snapshot(settings.data_dir, STARTED, throttled_flags=_throttled[0])


def snapshot(settings: Settings, store: Store) -> dict:
    """Everything the page shows but the charts."""
    now = utcnow()
    configured = store.meta_get("configuration") or {}
    return {
        "now": iso(now),
        "device": settings.device_id,
        "rooms": latest(store, now),
        "cloud": cloud(settings, store, now),
        "alerts": alerts(store),
        "actuators": store.actuator_states(),
        "commands": local_commands(store),
        "mode": effective_modes(settings.control_mode, configured.get("mode")),
        "thresholds": thresholds(settings, store),
        "health": gateway_health(settings),
    }
