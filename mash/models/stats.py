"""The guide's stats (``get_stats``), derived from the store so every process agrees."""
from __future__ import annotations

from peewee import fn

from mash.clock import as_datetime, iso, utcnow
from mash.models.migrations import SCHEMA_VERSION
from mash.models.schema import ACK, ALERT, PENDING, REJECTED, SYNCED


def collect(store) -> dict:
    """``backend_online``, ``mqtt_online``, ``firebase_online``, ``total_synced``,
    ``pending_records``, ``last_sync`` (the guide's), and what a grower needs besides."""
    S = store.m.SensorData
    now = utcnow()
    sinks = {s.name: s for s in store.m.SinkState.select()}
    counts = dict(S.select(S.synced, fn.COUNT(S.id)).group_by(S.synced).tuples())
    last_sync = S.select(fn.MAX(S.synced_at)).scalar()
    progress = store.backend_progress()
    oldest = (S.select(S.timestamp).where((S.id > progress) & (S.synced == PENDING))
              .order_by(S.id).limit(1).scalar())
    last_id = store.last_reading_id()
    fb = sinks.get("firebase")
    newest_ts = S.select(S.timestamp).order_by(S.id.desc()).limit(1).scalar()
    counters = store.counters()
    hold = store.clock_hold()
    storage = store.meta_get("storage") or {}
    processes = store.processes()
    # the online flags are the worker's: a worker that stopped beating is online nowhere
    worker_alive = bool(processes.get("worker", {}).get("alive"))
    return {
        "backend_online": worker_alive and bool(sinks.get("backend") and sinks["backend"].online),
        "mqtt_online": worker_alive and bool(sinks.get("mqtt") and sinks["mqtt"].online),
        "firebase_online": worker_alive and bool(fb and fb.online),
        "processes": processes,
        "total_synced": counts.get(SYNCED, 0),
        "pending_records": counts.get(PENDING, 0),
        "rejected_records": counts.get(REJECTED, 0),
        "last_sync": iso(as_datetime(last_sync)),
        "oldest_pending_age_s": round((now - as_datetime(oldest)).total_seconds(), 1) if oldest else 0,
        "last_reading": iso(as_datetime(newest_ts)),
        "firebase_lag_records": max(0, last_id - (fb.progress if fb else 0)),
        "alerts_pending": store.outbox.owed_count(ALERT),
        "commands_unacked": store.outbox.owed_count(ACK),
        "bad_lines": sum(v for k, v in counters.items() if k.startswith("bad_line.")),
        "storage_used_mb": storage.get("used_mb"),
        "storage_over_budget": bool(storage.get("over")),
        "readings_deleted_by_retention": counters.get("retention_deleted", 0),
        # alerts and acks a long-unreachable sink was owed, deleted when the store needed room
        "owed_dropped_by_retention": sum(v for k, v in counters.items()
                                         if k.startswith("outbox_dropped.")),
        "actuators": store.actuator_states(),
        # readings stamped before the clock was synchronized, held from every sink
        "clock_held_readings": (last_id - hold + 1) if hold else 0,
        "schema_version": SCHEMA_VERSION,
    }


SINK_WORDS = {"off": "off (not configured)", "unknown": "unknown (worker not running)"}


def sink_states(store, settings, processes: dict | None = None) -> dict[str, str]:
    """Each sink as ``online``, ``offline``, ``off`` (its settings absent) or ``unknown``
    (the worker, whose flags they are, is not running): ``mash status`` and the dashboard."""
    processes = store.processes() if processes is None else processes
    worker_alive = bool((processes.get("worker") or {}).get("alive"))
    states = {}
    for name, on in (("backend", settings.backend_enabled), ("mqtt", settings.mqtt_enabled),
                     ("firebase", settings.firebase_enabled)):
        states[name] = ("off" if not on else "unknown" if not worker_alive else
                        "online" if store.sink(name).online else "offline")
    return states
