"""The store: every reading, alert, command and counter, in one SQLite file (peewee, WAL).

SQLite is the only channel between the reader and the worker, so this module is the only
owner of that file. ``DatabaseManager`` is the guide's name for it; the models are public so
the guide's troubleshooting query (``SELECT COUNT(*) FROM sensor_data WHERE synced = 0``)
and ad-hoc queries work on the same tables.

Durability: WAL with ``synchronous=FULL``. In WAL mode NORMAL never corrupts the file but may
roll back the last transactions on a power cut; FULL fsyncs the WAL at every commit, so a
reading the reader has committed survives ``kill -9`` and a power cut. At one line per 5 s
that is one fsync per 5 s, which the SD card does not notice.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import logging
import secrets
import threading
import time
from pathlib import Path

from peewee import (AutoField, CharField, DateTimeField, FloatField, IntegerField,
                    IntegrityError, Model,
                    SqliteDatabase, TextField, fn)

from mash.models.migrations import SCHEMA_VERSION, migrate

log = logging.getLogger(__name__)

# IMMEDIATE: a transaction that reads then writes takes the write lock up front, so two
# processes never deadlock on a lock upgrade (which SQLite answers with "database is locked").
db = SqliteDatabase(None, lock_type="IMMEDIATE")

PENDING, SYNCED, REJECTED = 0, 1, -1

# One writer at a time within a process. SQLite serialises writers anyway, but a thread that
# finds the database locked sleeps in SQLite's busy handler (1, 2, 5 ... 100 ms steps); a
# Python lock wakes the next writer as soon as the last one commits.
_write_lock = threading.RLock()


def writes(method):
    """Mark a DatabaseManager method that writes: it runs under the process's write lock."""
    @functools.wraps(method)
    def locked(*args, **kwargs):
        with _write_lock:
            return method(*args, **kwargs)
    return locked


def utcnow() -> dt.datetime:
    """Naive UTC: what every timestamp column holds."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def iso(ts: dt.datetime | None) -> str | None:
    """ISO 8601 with milliseconds and Z, the backend's format."""
    if ts is None:
        return None
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def parse_iso(value) -> dt.datetime | None:
    """An ISO 8601 string (with Z or an offset) as naive UTC, or None when it is not one."""
    if not isinstance(value, str) or len(value) > 40:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return parsed


class BaseModel(Model):
    class Meta:
        database = db


class SensorData(BaseModel):
    """One row per room per reading line. ``synced``: 0 pending, 1 accepted, -1 rejected."""
    id = AutoField()
    room = CharField()
    temperature = FloatField()
    humidity = FloatField()
    co2 = IntegerField()
    timestamp = DateTimeField()             # UTC, when the gateway received the line
    synced = IntegerField(default=PENDING)
    synced_at = DateTimeField(null=True)
    fb_key = CharField()                     # Firebase key, fixed at store time (CONTRACT §4)

    class Meta:
        table_name = "sensor_data"


class Alert(BaseModel):
    """A threshold condition starting (``raised``) or ending (``cleared``)."""
    id = AutoField()
    event_type = CharField()
    severity = CharField()
    room = CharField(null=True)
    value = FloatField(null=True)
    threshold = FloatField(null=True)
    message = TextField()
    state = CharField()                      # raised | cleared
    created_at = DateTimeField()
    backend_done_at = DateTimeField(null=True)
    backend_error = TextField(null=True)
    mqtt_done_at = DateTimeField(null=True)

    class Meta:
        table_name = "alerts"


class Command(BaseModel):
    """The command ledger: one row per command id, whichever channel brought it."""
    seq = AutoField()
    command_id = CharField(unique=True)
    command = CharField()
    parameters = TextField(default="{}")
    source = CharField()                     # backend | mqtt
    received_at = DateTimeField()
    expires_at = DateTimeField(null=True)
    status = CharField()                     # queued | running | completed | failed
    reason = TextField(null=True)
    response = TextField(null=True)
    attempts = IntegerField(default=0)
    finished_at = DateTimeField(null=True)
    backend_acked_at = DateTimeField(null=True)
    backend_ack_error = TextField(null=True)
    mqtt_acked_at = DateTimeField(null=True)

    class Meta:
        table_name = "commands"


class ActuatorState(BaseModel):
    actuator = CharField(primary_key=True)
    desired = CharField()
    updated_at = DateTimeField()

    class Meta:
        table_name = "actuator_state"


class Counter(BaseModel):
    name = CharField(primary_key=True)
    value = IntegerField(default=0)

    class Meta:
        table_name = "counters"


class SinkState(BaseModel):
    """What each sink last did, so any process reports the same ``mash status``."""
    name = CharField(primary_key=True)       # backend | mqtt | firebase
    online = IntegerField(default=0)
    last_ok = DateTimeField(null=True)
    last_error = TextField(null=True)
    progress = IntegerField(default=0)       # highest reading id the sink has (firebase)

    class Meta:
        table_name = "sink_state"


class KeyValue(BaseModel):
    """Small facts: schema version, database uid, CONFIGURE'd settings, last rejection."""
    key = CharField(primary_key=True)
    value = TextField()

    class Meta:
        table_name = "meta"


MODELS = [SensorData, Alert, Command, ActuatorState, Counter, SinkState, KeyValue]


def open_database(path: str | Path) -> SqliteDatabase:
    """Bind ``db`` to ``path`` (WAL, synchronous=FULL) and bring the schema up to date."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not db.is_closed():
        db.close()
    db.init(str(path), timeout=30, pragmas={
        "journal_mode": "wal",
        "synchronous": 2,            # FULL: see the module docstring
        "foreign_keys": 1,
        "busy_timeout": 30000,
        "cache_size": -2000,
    })
    db.connect(reuse_if_open=True)
    migrate(db, MODELS)
    return db


class DatabaseManager:
    """The guide's store API over the models above; one per process is enough."""

    def __init__(self, path: str | Path | None = None):
        if path is None:
            from mash.config import Settings
            path = Settings.load().db_path
        self.path = Path(path)
        open_database(self.path)
        self.uid = self.meta_get("db_uid")
        if not self.uid:
            self.uid = secrets.token_hex(6)
            self.meta_set("db_uid", self.uid)
        self._last_fb_key: dict[str, str] = {}
        self._sink_seen: dict[str, tuple[bool, float]] = {}

    # -- identities ---------------------------------------------------------------------
    def reading_id(self, row_id: int) -> str:
        """Globally unique, stable: this database's random uid and the row id.

        Row ids are never reused: retention never deletes the newest row, and SQLite hands
        out max(rowid)+1."""
        return f"{self.uid}-{row_id}"

    def alert_id(self, row_id: int) -> str:
        return f"{self.uid}-a{row_id}"

    # -- readings -----------------------------------------------------------------------
    def _fb_key(self, room: str, ts: dt.datetime) -> str:
        base = ts.strftime("%Y-%m-%dT%H-%M-%S")
        last = self._last_fb_key.get(room)
        if last is None:
            row = (SensorData.select(SensorData.fb_key).where(SensorData.room == room)
                   .order_by(SensorData.id.desc()).first())
            last = row.fb_key if row else ""
        if last == base or last.startswith(base + "-"):
            n = int(last.rsplit("-", 1)[1]) + 1 if last != base else 1
            key = f"{base}-{n}"
        else:
            key = base
        self._last_fb_key[room] = key
        return key

    @writes
    def save_sensor_data(self, data: dict, timestamp: dt.datetime | float | None = None) -> list[int]:
        """Store one reading line (``{"fruiting": {...}, "spawning": {...}}``) atomically.

        Accepts the guide's shape (``temp``/``humidity``/``co2`` per room, optional
        top-level ``timestamp`` in epoch seconds). Returns the new row ids."""
        ts = timestamp if timestamp is not None else data.get("timestamp")
        if isinstance(ts, (int, float)):
            ts = dt.datetime.fromtimestamp(ts, dt.timezone.utc).replace(tzinfo=None)
        ts = ts or utcnow()
        rows = []
        for room, values in data.items():
            if room == "timestamp" or not isinstance(values, dict):
                continue
            rows.append(dict(room=room, temperature=float(values["temp"]),
                             humidity=float(values["humidity"]), co2=int(values["co2"]),
                             timestamp=ts, fb_key=self._fb_key(room, ts)))
        if not rows:
            return []
        # One statement: atomic by itself (no nested savepoint inside a caller's transaction),
        # and SQLite numbers the rows of one INSERT consecutively.
        last = SensorData.insert_many(rows).execute()
        return list(range(last - len(rows) + 1, last + 1))

    def unsynced(self, limit: int, after_id: int = 0, upto: int | None = None) -> list[SensorData]:
        cond = (SensorData.synced == PENDING) & (SensorData.id > after_id)
        if upto is not None:
            cond &= SensorData.id <= upto
        return list(SensorData.select().where(cond).order_by(SensorData.id).limit(limit))

    @writes
    def mark_synced(self, ids: list[int]) -> int:
        with db.atomic():
            return (SensorData.update(synced=SYNCED, synced_at=utcnow())
                    .where(SensorData.id.in_(ids) & (SensorData.synced != SYNCED)).execute())

    @writes
    def mark_rejected(self, ids: list[int], reason: str) -> None:
        with db.atomic():
            SensorData.update(synced=REJECTED).where(SensorData.id.in_(ids)).execute()
            self.incr("sync_rejected", len(ids))
            self.meta_set("last_rejection", {"at": iso(utcnow()), "count": len(ids),
                                             "first_id": min(ids), "reason": reason[:500]})

    @writes
    def retry_rejected(self) -> int:
        return SensorData.update(synced=PENDING).where(SensorData.synced == REJECTED).execute()

    def readings_after(self, after_id: int, limit: int, upto: int | None = None) -> list[SensorData]:
        cond = SensorData.id > after_id
        if upto is not None:
            cond &= SensorData.id <= upto
        return list(SensorData.select().where(cond).order_by(SensorData.id).limit(limit))

    def last_reading_id(self) -> int:
        return SensorData.select(fn.MAX(SensorData.id)).scalar() or 0

    def pending_count(self) -> int:
        return SensorData.select().where(SensorData.synced == PENDING).count()

    # -- counters and meta --------------------------------------------------------------
    @writes
    def incr(self, name: str, n: int = 1) -> None:
        if n:
            (Counter.insert(name=name, value=n)
             .on_conflict(conflict_target=[Counter.name],
                          update={Counter.value: Counter.value + n}).execute())

    def counters(self) -> dict[str, int]:
        return {c.name: c.value for c in Counter.select()}

    def meta_get(self, key: str, default=None):
        row = KeyValue.get_or_none(KeyValue.key == key)
        return json.loads(row.value) if row else default

    @writes
    def meta_set(self, key: str, value) -> None:
        KeyValue.replace(key=key, value=json.dumps(value)).execute()

    @contextlib.contextmanager
    def transaction(self):
        """A write transaction under the process's write lock. Every transaction that writes
        takes the lock first: holding SQLite's write lock while waiting for the Python one
        (say, a @writes method called inside a bare db.atomic()) would deadlock two threads."""
        with _write_lock, db.atomic():
            yield

    def data_version(self) -> int:
        """Changes whenever another connection commits: a free 'anything new?' check."""
        return db.execute_sql("PRAGMA data_version").fetchone()[0]

    # -- alerts -------------------------------------------------------------------------
    @writes
    def add_alerts(self, events) -> None:
        now = utcnow()
        rows = [dict(event_type=e.event_type, severity=e.severity, room=e.room, value=e.value,
                     threshold=e.threshold, message=e.message, state=e.state, created_at=now)
                for e in events]
        if rows:
            Alert.insert_many(rows).execute()       # one statement, atomic by itself

    def active_alert_keys(self) -> set[tuple[str, str]]:
        """(room, event_type) whose latest alert is ``raised``: conditions still on."""
        latest = (Alert.select(Alert.room, Alert.event_type, fn.MAX(Alert.id).alias("last"))
                  .group_by(Alert.room, Alert.event_type))
        ids = [row.last for row in latest]
        return {(a.room, a.event_type) for a in
                Alert.select().where(Alert.id.in_(ids) & (Alert.state == "raised"))}

    def undelivered_alerts(self, sink: str, limit: int = 100) -> list[Alert]:
        col = Alert.backend_done_at if sink == "backend" else Alert.mqtt_done_at
        return list(Alert.select().where(col.is_null()).order_by(Alert.id).limit(limit))

    @writes
    def alert_delivered(self, alert_id: int, sink: str, error: str | None = None) -> None:
        col = "backend_done_at" if sink == "backend" else "mqtt_done_at"
        changes = {col: utcnow()}
        if sink == "backend":
            changes["backend_error"] = error
        Alert.update(**changes).where(Alert.id == alert_id).execute()

    # -- command ledger -----------------------------------------------------------------
    @writes
    def add_command(self, command_id: str, command: str, parameters: dict, source: str,
                    expires_at: dt.datetime | None = None, status: str = "queued",
                    reason: str | None = None) -> bool:
        """Put a command in the ledger once; False when its id was already there."""
        now = utcnow()
        done = status in ("completed", "failed")
        try:
            with db.atomic():
                if Command.select().where(Command.command_id == command_id).exists():
                    return False
                Command.create(command_id=command_id, command=command,
                               parameters=json.dumps(parameters), source=source, received_at=now,
                               expires_at=expires_at, status=status, reason=reason,
                               finished_at=now if done else None)
        except IntegrityError:      # another thread or process stored it first
            return False
        return True

    def known_command(self, command_id: str) -> bool:
        return Command.select().where(Command.command_id == command_id).exists()

    def next_board_command(self) -> Command | None:
        return (Command.select()
                .where(Command.status.in_(["queued", "running"]) &
                       (Command.command == "set_actuator"))
                .order_by(Command.seq).first())

    @writes
    def claim_command(self) -> Command | None:
        """Take the next queued ``set_actuator`` command for an executor other than the
        reader (the guide's sync manager): mark it running and return it."""
        with db.atomic():
            cmd = self.next_board_command()
            if cmd is None or cmd.status != "queued":
                return None
            self.start_command(cmd.command_id)
            return cmd

    @writes
    def start_command(self, command_id: str) -> int:
        with db.atomic():
            Command.update(status="running", attempts=Command.attempts + 1).where(
                Command.command_id == command_id).execute()
            return Command.get(Command.command_id == command_id).attempts

    @writes
    def finish_command(self, command_id: str, ok: bool, reason: str | None = None,
                       response: dict | None = None, desired: tuple[str, str] | None = None) -> bool:
        """Record a command's final status once; False if it was already final."""
        with db.atomic():
            changed = (Command.update(status="completed" if ok else "failed", reason=reason,
                                      response=json.dumps(response or {}), finished_at=utcnow())
                       .where((Command.command_id == command_id) &
                              Command.status.not_in(["completed", "failed"])).execute())
            if changed and desired:
                self.set_desired(*desired)
        return bool(changed)

    def has_undelivered(self) -> bool:
        """Any alert or command outcome still owed to a sink (a read, no write)."""
        return (Alert.select().where(Alert.backend_done_at.is_null() |
                                     Alert.mqtt_done_at.is_null()).exists() or
                Command.select().where(Command.status.in_(["completed", "failed"]) &
                                       (Command.backend_acked_at.is_null() |
                                        Command.mqtt_acked_at.is_null())).exists())

    def unacked_commands(self, sink: str, limit: int = 100) -> list[Command]:
        col = Command.backend_acked_at if sink == "backend" else Command.mqtt_acked_at
        return list(Command.select().where(Command.status.in_(["completed", "failed"]) &
                                           col.is_null()).order_by(Command.seq).limit(limit))

    @writes
    def command_acked(self, command_id: str, sink: str, error: str | None = None) -> None:
        changes = {"backend_acked_at" if sink == "backend" else "mqtt_acked_at": utcnow()}
        if sink == "backend":
            changes["backend_ack_error"] = error
        Command.update(**changes).where(Command.command_id == command_id).execute()

    # -- actuators ----------------------------------------------------------------------
    def desired_states(self) -> dict[str, str]:
        return {a.actuator: a.desired for a in ActuatorState.select().order_by(ActuatorState.actuator)}

    @writes
    def set_desired(self, actuator: str, state: str) -> None:
        ActuatorState.replace(actuator=actuator, desired=state, updated_at=utcnow()).execute()

    # -- sinks --------------------------------------------------------------------------
    SINK_REFRESH = 60.0     # seconds between rewrites of an unchanged "online" (SD-card writes)

    @writes
    def sink_ok(self, name: str, **extra) -> bool:
        """Record a success; True when the sink was offline before (a state change).

        An unchanged online state is rewritten at most once a minute (``last_ok``), not on
        every call: a 10 s command poll would otherwise cost a page write each time."""
        cached = self._sink_seen.get(name)
        if not extra and cached and cached[0] and time.monotonic() - cached[1] < self.SINK_REFRESH:
            return False
        self._sink_seen[name] = (True, time.monotonic())
        row = SinkState.get_or_none(SinkState.name == name)
        was_online = bool(row and row.online)
        (SinkState.insert(name=name, online=1, last_ok=utcnow(), last_error=None, **extra)
         .on_conflict(conflict_target=[SinkState.name],
                      update={SinkState.online: 1, SinkState.last_ok: utcnow(),
                              SinkState.last_error: None, **{getattr(SinkState, k): v
                                                             for k, v in extra.items()}})
         .execute())
        return not was_online

    @writes
    def sink_failed(self, name: str, error: str) -> bool:
        """Record a failure; True when the sink was online before (a state change)."""
        self._sink_seen[name] = (False, time.monotonic())
        row = SinkState.get_or_none(SinkState.name == name)
        was_online = bool(row is None or row.online)
        (SinkState.insert(name=name, online=0, last_error=error[:500])
         .on_conflict(conflict_target=[SinkState.name],
                      update={SinkState.online: 0, SinkState.last_error: error[:500]})
         .execute())
        return was_online

    def sink(self, name: str) -> SinkState:
        return SinkState.get_or_none(SinkState.name == name) or SinkState(name=name, online=0,
                                                                          progress=0)

    # -- disk budget --------------------------------------------------------------------
    def used_bytes(self) -> int:
        """Bytes of the file in use (pages minus the free list; WAL excluded)."""
        page_size = db.execute_sql("PRAGMA page_size").fetchone()[0]
        pages = db.execute_sql("PRAGMA page_count").fetchone()[0]
        free = db.execute_sql("PRAGMA freelist_count").fetchone()[0]
        return (pages - free) * page_size

    @writes
    def enforce_budget(self, max_bytes: int, firebase_on: bool = False, chunk: int = 2000) -> dict:
        """Keep the store under ``max_bytes`` by deleting the oldest readings that every
        sink already has (synced to the backend, and backed up to Firebase when it is on).
        Unsynced readings, alerts and commands are never deleted here: if they alone exceed
        the budget the result says ``over`` and the caller raises the alarm. Freed pages are
        reused by new rows, so the file stops growing rather than shrinking."""
        used = self.used_bytes()
        deleted = 0
        newest = self.last_reading_id()       # never deleted: row ids must never be reused
        limit_id = self.sink("firebase").progress if firebase_on else newest
        while used > max_bytes:
            ids = [r.id for r in SensorData.select(SensorData.id)
                   .where((SensorData.synced == SYNCED) & (SensorData.id < newest) &
                          (SensorData.id <= limit_id))
                   .order_by(SensorData.id).limit(chunk)]
            if not ids:
                break
            with db.atomic():
                SensorData.delete().where(SensorData.id.in_(ids)).execute()
            deleted += len(ids)
            used = self.used_bytes()
        if deleted:
            self.incr("retention_deleted", deleted)
        state = {"used_mb": round(used / 2**20, 1), "max_mb": round(max_bytes / 2**20, 1),
                 "over": used > max_bytes, "deleted": deleted}
        if self.meta_get("storage", {}).get("over") != state["over"] or deleted:
            self.meta_set("storage", {k: v for k, v in state.items() if k != "deleted"})
        return state

    # -- stats --------------------------------------------------------------------------
    def get_stats(self) -> dict:
        """The guide's stats, derived from the store so every process reports the same."""
        now = utcnow()
        sinks = {s.name: s for s in SinkState.select()}
        counts = dict(SensorData.select(SensorData.synced, fn.COUNT(SensorData.id))
                      .group_by(SensorData.synced).tuples())
        last_sync = SensorData.select(fn.MAX(SensorData.synced_at)).scalar()
        oldest = (SensorData.select(fn.MIN(SensorData.timestamp))
                  .where(SensorData.synced == PENDING).scalar())
        last_id = self.last_reading_id()
        fb = sinks.get("firebase")
        newest_ts = SensorData.select(fn.MAX(SensorData.timestamp)).scalar()
        counters = self.counters()
        storage = self.meta_get("storage") or {}
        return {
            "backend_online": bool(sinks.get("backend") and sinks["backend"].online),
            "mqtt_online": bool(sinks.get("mqtt") and sinks["mqtt"].online),
            "firebase_online": bool(fb and fb.online),
            "total_synced": counts.get(SYNCED, 0),
            "pending_records": counts.get(PENDING, 0),
            "rejected_records": counts.get(REJECTED, 0),
            "last_sync": iso(_as_dt(last_sync)),
            "oldest_pending_age_s": round((now - _as_dt(oldest)).total_seconds(), 1) if oldest else 0,
            "last_reading": iso(_as_dt(newest_ts)),
            "firebase_lag_records": max(0, last_id - (fb.progress if fb else 0)),
            "alerts_pending": Alert.select().where(Alert.backend_done_at.is_null() |
                                                   Alert.mqtt_done_at.is_null()).count(),
            "commands_unacked": Command.select().where(
                Command.status.in_(["completed", "failed"]) &
                (Command.backend_acked_at.is_null() | Command.mqtt_acked_at.is_null())).count(),
            "bad_lines": sum(v for k, v in counters.items() if k.startswith("bad_line.")),
            "storage_used_mb": storage.get("used_mb"),
            "storage_over_budget": bool(storage.get("over")),
            "readings_deleted_by_retention": counters.get("retention_deleted", 0),
            "schema_version": SCHEMA_VERSION,
        }


def _as_dt(value):
    if isinstance(value, str):
        return dt.datetime.fromisoformat(value)
    return value


__all__ = ["DatabaseManager", "SensorData", "Alert", "Command", "ActuatorState", "Counter",
           "SinkState", "KeyValue", "db", "open_database", "utcnow", "iso", "parse_iso"]
