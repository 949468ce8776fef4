"""Schema versions, kept in SQLite's ``PRAGMA user_version``.

A new database gets the current models and the current version at once. An existing one is
brought forward one step at a time; each step is a function of ``(db, migrator, models)``
using ``playhouse.migrate`` (add_column, drop_column, ...), run in one transaction with the
version bump, so a power cut mid-upgrade leaves the old version intact. To change the schema:
edit the model, add ``STEPS[n+1]`` doing the same change to an old file, bump
``SCHEMA_VERSION``.
"""
from __future__ import annotations

import json
import logging

from playhouse.migrate import SqliteMigrator
from playhouse.migrate import migrate as apply_operations

from mash.ids import alert_id
from mash.models.schema import create_indexes

log = logging.getLogger(__name__)

SCHEMA_VERSION = 6
# The oldest schema version whose code can still run on a file at SCHEMA_VERSION. Steps are
# additive (a new table, a nullable column or one with a default, an index), so an older
# release that ignores them runs on the migrated file: an update's rollback needs that. A
# step that is not additive raises this to SCHEMA_VERSION, and `mash update` refuses a
# release whose COMPATIBLE_FROM is above the running one's SCHEMA_VERSION (docs/DESIGN.md).
COMPATIBLE_FROM = 6
COMPAT_KEY = "schema.compatible_from"      # meta: COMPATIBLE_FROM of the code that migrated it


class SchemaTooNew(RuntimeError):
    pass


def _v2(db, migrator, m) -> None:
    """One outbox for alerts and acks instead of per-table delivery columns; the backend's
    progress marker instead of the partial index on pending readings (an index page less
    written per reading); who set each relay (the climate controller's restore rule)."""
    db.create_tables([m.Outbox])
    uid_row = db.execute_sql("SELECT value FROM meta WHERE key = 'db_uid'").fetchone()
    uid = json.loads(uid_row[0]) if uid_row else "0"
    owed = []
    for row in db.execute_sql(
            "SELECT id, event_type, severity, room, value, threshold, message, state, created_at,"
            " backend_done_at, mqtt_done_at FROM alerts WHERE backend_done_at IS NULL"
            " OR mqtt_done_at IS NULL").fetchall():
        (aid, etype, sev, room, value, thr, msg, state, created, b_done, m_done) = row
        cleared = state == "cleared"
        payload = {"id": alert_id(uid, aid), "room": room,
                   "type": f"{etype}_cleared" if cleared else etype,
                   "severity": "INFO" if cleared else sev, "message": msg, "value": value,
                   "threshold": thr, "timestamp": created and created.replace(" ", "T")[:23] + "Z"}
        owed += [("alert", str(aid), sink, payload, created)
                 for sink, done in (("backend", b_done), ("mqtt", m_done)) if done is None]
    for row in db.execute_sql(
            "SELECT command_id, status, reason, response, finished_at, backend_acked_at,"
            " mqtt_acked_at FROM commands WHERE status IN ('completed', 'failed') AND"
            " (backend_acked_at IS NULL OR mqtt_acked_at IS NULL)").fetchall():
        (cid, status, reason, response, finished, b_done, m_done) = row
        resp = json.loads(response) if response else {}
        if reason:
            resp["reason"] = reason
        payload = {"id": cid, "status": status, "response": resp,
                   "timestamp": finished and finished.replace(" ", "T")[:23] + "Z"}
        owed += [("ack", cid, sink, payload, finished)
                 for sink, done in (("backend", b_done), ("mqtt", m_done)) if done is None]
    for kind, ref, sink, payload, created in owed:
        m.Outbox.insert(kind=kind, ref=ref, sink=sink, payload=json.dumps(payload),
                        created_at=created).execute()
    apply_operations(*[migrator.drop_column("alerts", c) for c in ("backend_done_at", "backend_error",
                                                       "mqtt_done_at")],
        *[migrator.drop_column("commands", c) for c in ("backend_acked_at", "backend_ack_error",
                                                         "mqtt_acked_at")])
    apply_operations(migrator.add_column("actuator_state", "source", m.ActuatorState.source))
    db.execute_sql("DROP INDEX IF EXISTS sensor_data_pending")
    first = db.execute_sql("SELECT MIN(id) FROM sensor_data WHERE synced = 0").fetchone()[0]
    last = db.execute_sql("SELECT MAX(id) FROM sensor_data").fetchone()[0] or 0
    progress = (first - 1) if first is not None else last
    db.execute_sql("INSERT INTO sink_state (name, online, progress) VALUES ('backend', 0, ?) "
                   "ON CONFLICT(name) DO UPDATE SET progress = excluded.progress", (progress,))
    log.info("schema v2: %d owed deliveries moved to the outbox", len(owed))


def _v3(db, migrator, m) -> None:
    """Readings stamped before the clock was synchronized carry their boot-relative time
    until they are rebased (the honest clock)."""
    apply_operations(migrator.add_column("sensor_data", "mono", m.SensorData.mono),
                     migrator.add_column("sensor_data", "boot", m.SensorData.boot))


def _v4(db, migrator, m) -> None:
    """Readings of the simulated board are marked (they never reach a sink unless asked);
    partial indexes for the open commands and the owed outbox items (hot loops)."""
    apply_operations(migrator.add_column("sensor_data", "simulated", m.SensorData.simulated))
    create_indexes(db)


def _v5(db, migrator, m) -> None:
    """Indexes for the hot reads retention's bounded tables still leave: the urgent owed
    items, the grower's own commands, each condition's latest alert."""
    create_indexes(db)


def _v6(db, migrator, m) -> None:
    """Each room's hourly sums for the MASH apps' ``historical_aggregates``, with what was
    last written of each hour (the per-hour progress of the Firebase backfill)."""
    db.create_tables([m.HourAggregate])
    create_indexes(db)


# version -> step that upgrades a database from version-1 to version.
STEPS = {2: _v2, 3: _v3, 4: _v4, 5: _v5, 6: _v6}


def migrate(db, models) -> int:
    """Bring ``db`` to SCHEMA_VERSION; raise SchemaTooNew for a file from a newer gateway.

    The version is read again inside the write transaction: the reader and the worker may
    open a new file at the same moment, and the one that waited must see the other's work."""
    if _check(db) >= SCHEMA_VERSION:
        return SCHEMA_VERSION
    with db.atomic():
        current = _check(db)
        if current >= SCHEMA_VERSION:      # a newer release's file this code can run on
            return current
        if current == 0 and not db.table_exists("sensor_data"):
            db.create_tables([getattr(models, m) for m in vars(models)])
            create_indexes(db)
        else:
            migrator = SqliteMigrator(db)
            for version in range(max(current, 1) + 1, SCHEMA_VERSION + 1):
                log.info("migrating %s to schema v%d", db.database, version)
                STEPS[version](db, migrator, models)
        db.pragma("user_version", SCHEMA_VERSION)
        db.execute_sql("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                       (COMPAT_KEY, json.dumps({"schema": SCHEMA_VERSION,
                                                "compatible_from": COMPATIBLE_FROM})))
    return SCHEMA_VERSION


def compatible_from(db) -> int | None:
    """The COMPATIBLE_FROM recorded by the code that migrated the file to its schema version
    (None when not recorded, or recorded for another version than the file's)."""
    try:
        row = db.execute_sql("SELECT value FROM meta WHERE key = ?", (COMPAT_KEY,)).fetchone()
    except Exception:           # no meta table yet: a new file
        return None
    try:
        found = json.loads(row[0]) if row else {}
        if found.get("schema") != db.pragma("user_version"):
            return None
        return int(found["compatible_from"])
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def _check(db) -> int:
    """The file's schema version; SchemaTooNew for a newer file this code cannot run on (one
    newer and compatible, by the file's own ``schema.compatible_from``, is run as it is)."""
    current = db.pragma("user_version")
    if current > SCHEMA_VERSION:
        floor = compatible_from(db)
        if floor is None or floor > SCHEMA_VERSION:
            raise SchemaTooNew(f"{db.database} has schema v{current}, newer than this gateway's "
                               f"v{SCHEMA_VERSION}: upgrade the gateway, do not delete the file")
    return current


__all__ = ["COMPATIBLE_FROM", "SCHEMA_VERSION", "SchemaTooNew", "compatible_from", "migrate"]
