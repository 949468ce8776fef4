"""The store: one SQLite file (peewee, WAL) holding every reading, alert, command and counter.

SQLite is the only channel between the reader, the worker and the dashboard, so a ``Store``
is the only owner of its file in a process. Each store binds its own models to its own
database: two stores on two files work side by side in one process.

Durability: WAL with ``synchronous=FULL``. In WAL mode NORMAL never corrupts the file but may
roll back the last transactions on a power cut; FULL fsyncs the WAL at every commit, so a
reading the reader has committed survives ``kill -9`` and a power cut. New files use 1 KiB
pages: a reading line dirties one leaf page, and a WAL frame is a page plus 24 bytes, so the
SD card sees a quarter of what 4 KiB pages cost (docs/BENCHMARKS.md).
"""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

from peewee import DatabaseError, SqliteDatabase, fn

from mash import __version__, ids, wakeup
from mash.clock import from_epoch, iso, utcnow
from mash.config import Settings
from mash.contract import ROOMS
from mash.models import apps_outbox, retention, stats
from mash.models.migrations import SCHEMA_VERSION, SchemaTooNew, compatible_from, migrate
from mash.models.ledger import LedgerMixin, writes
from mash.models.outbox import ALERT, Outbox, alert_payload
from mash.models.outbox import NOTIFY_ROUTES, notify_payload, notify_sinks_for
from mash.models.schema import LOCAL, PENDING, REJECTED, SYNCED, bind_models

PAGE_SIZE = 1024
CORRUPT = ("file is not a database", "database disk image is malformed")

log = logging.getLogger("mash.store")


class StoreMissing(FileNotFoundError):
    """A read-only open of a store that does not exist (nothing is created)."""

    def __init__(self, path: Path):
        super().__init__(f"no store at {path}: has the reader run?")


class StoreCorrupt(DatabaseError):
    """A read-only open of a store SQLite cannot read (the writers set it aside)."""


class StoreOutdated(RuntimeError):
    """A read-only open of a store not yet migrated to this gateway's schema."""


def is_corrupt(exc: BaseException) -> bool:
    return any(marker in str(exc) for marker in CORRUPT)


def _file_id(path: Path):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


_held = threading.local()      # lock files this thread holds (the lock is re-entrant)


@contextlib.contextmanager
def _file_lock(path: Path, create: bool = True):
    """``mash.db.lock``: held while a store file is created or a corrupt one set aside, so
    of several processes finding it corrupt at once exactly one moves it."""
    lock = path.with_name(path.name + ".lock")
    held = _held.__dict__.setdefault("paths", set())
    if lock in held:
        yield
        return
    try:
        fd = os.open(lock, (os.O_RDWR | os.O_CREAT) if create else os.O_RDONLY, 0o600)
    except OSError:
        if create:
            raise
        yield                            # a read-only opener with no lock file: nobody writes
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        held.add(lock)
        yield
    finally:
        held.discard(lock)
        os.close(fd)


class _FileDb(SqliteDatabase):
    """A SqliteDatabase that follows its path: when the file there is replaced (a corrupt
    store set aside, by this process or another), each thread's next statement outside a
    transaction reconnects to the new file (a stat() per statement: a microsecond); a
    corrupt-file error calls ``on_corrupt``."""

    def __init__(self, path: Path, on_corrupt, on_reopen, **kwargs):
        self.file, self.on_corrupt, self.on_reopen = path, on_corrupt, on_reopen
        super().__init__(**kwargs)

    def _connect(self):
        conn = super()._connect()
        self._state.file_id = _file_id(self.file)
        return conn

    def cursor(self, named_cursor=None):
        st = self._state
        if not st.closed and not st.transactions and \
                _file_id(self.file) != getattr(st, "file_id", None):
            with _file_lock(self.file, create=False):    # until a fresh file is whole
                self.close()
                self.connect()
            self.on_reopen()
        return super().cursor(named_cursor)

    def execute_sql(self, sql, params=None):
        try:
            return super().execute_sql(sql, params)
        except DatabaseError as exc:
            if is_corrupt(exc):
                self.on_corrupt(exc, getattr(self._state, "file_id", None))
            raise


class Store(LedgerMixin):
    """The guide's ``DatabaseManager``: readings in, queries out, for every process.

    ``readonly``: for ``mash status`` / ``doctor`` / ``export`` and the dashboard's reads: the
    file is opened with SQLite's ``mode=ro``, never created or migrated (``StoreMissing``,
    ``StoreCorrupt``). A writable store that finds its file corrupt ("file is not a
    database", "malformed", at open or at any later statement) sets it aside as
    ``mash.db.corrupt-<UTC time>`` (with its -wal/-shm, kept, never deleted), starts a fresh
    one (a new uid) and raises a CRITICAL ``store_corrupt`` alert in it."""

    SINK_REFRESH = 300.0    # seconds between rewrites of an unchanged "online" (SD-card writes)

    def __init__(self, path: str | Path | None = None, readonly: bool = False):
        if path is None:             # the guide's DatabaseManager(): the configured file
            path = Settings.load().db_path
        self.path = Path(path)
        self.readonly = readonly
        if readonly and not self.path.exists():
            raise StoreMissing(self.path)
        if not readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        pragmas = [("foreign_keys", 1), ("busy_timeout", 30000), ("cache_size", -2000)]
        if not readonly:
            pragmas = [
                ("page_size", PAGE_SIZE),     # only takes effect on a new file: before WAL is on
                ("journal_mode", "wal"),
                ("synchronous", 2),           # FULL: see the module docstring
                *pragmas]
        # IMMEDIATE: a transaction that reads then writes takes the write lock up front, so
        # two processes never deadlock on a lock upgrade ("database is locked" at once).
        self.db = _FileDb(self.path, self._corrupt, self._reopened,
                          database=f"file:{self.path}?mode=ro" if readonly else str(self.path),
                          uri=readonly, timeout=30, lock_type="IMMEDIATE", pragmas=pragmas)
        self._lock = threading.RLock()
        self._writing = threading.local()     # this thread's depth of nested writes
        # every commit of a writing store wakes the other processes' waiting loops (a hint
        # with no data in it: mash.wakeup)
        self.hints = None if readonly else wakeup.Hints(wakeup.directory_for(self.path))
        self.m = bind_models(self.db)
        self.outbox = Outbox(self.m)
        self._last_fb_key: dict[str, str] = {}
        self._sink_seen: dict[str, tuple[bool, float]] = {}
        self.uid = None
        found = _file_id(self.path)
        try:
            self._open()
        except DatabaseError as exc:
            if not is_corrupt(exc):
                raise
            if readonly:
                raise StoreCorrupt(f"{self.path}: {exc}") from exc
            with contextlib.suppress(DatabaseError):
                self.db.close()
            self._corrupt(exc, found)     # (a no-op if a statement's error already did it)
            self._open()                  # the fresh file

    def _open(self) -> None:
        if self.readonly:
            self.db.connect(reuse_if_open=True)
            version = self.db.pragma("user_version")
            floor = compatible_from(self.db) if version > SCHEMA_VERSION else None
            newer_ok = floor is not None and floor <= SCHEMA_VERSION  # additive: runs as is
            if version != SCHEMA_VERSION and not newer_ok:
                if version > SCHEMA_VERSION:
                    raise SchemaTooNew(f"{self.path} has schema v{version}, newer than this "
                                       f"gateway's v{SCHEMA_VERSION}: upgrade the gateway")
                raise StoreOutdated(f"the store at {self.path} has schema v{version}, this "
                                    f"gateway v{SCHEMA_VERSION}: start the reader (it migrates it)")
            self.uid = self.meta_get("db_uid")
            return
        with _file_lock(self.path):          # one process creates or migrates a file
            self.db.connect(reuse_if_open=True)
            migrate(self.db, self.m)
            self.uid = self.meta_get("db_uid")
            if not self.uid:
                self.uid = ids.new_uid()
                self.meta_set("db_uid", self.uid)

    def _reopened(self) -> None:
        """This thread reconnected to a new file at the path (a corrupt one was set aside)."""
        if not self.readonly and self.db.pragma("user_version") == 0:
            self._open()                     # removed by hand while running: start afresh
        self.uid = self.meta_get("db_uid")
        self._last_fb_key.clear()
        self._sink_seen.clear()
        log.warning("store %s replaced: now using the fresh one (uid %s)", self.path, self.uid)

    def _corrupt(self, exc: Exception, file_id) -> None:
        """SQLite said the file is corrupt: set it aside unless another process already did
        (the file at the path is no longer the one that failed, or it reads fine now)."""
        if self.readonly:
            return
        with _file_lock(self.path):
            if _file_id(self.path) != file_id and file_id is not None:
                return                           # set aside already: reconnect to the new one
            try:
                probe = SqliteDatabase(str(self.path), timeout=30)
                ok = probe.execute_sql("PRAGMA quick_check").fetchone()[0] == "ok"
                probe.close()
            except DatabaseError:
                ok = False
            if ok:
                log.error("store error %s, but the file reads fine: kept in place", exc)
                return
            stamp = utcnow().strftime("%Y%m%dT%H%M%SZ")
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
            n = 1
            while aside.exists():                # twice in a second: never over an earlier one
                n += 1
                aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
            for suffix in ("", "-wal", "-shm"):
                src = self.path.with_name(self.path.name + suffix)
                if src.exists():
                    os.replace(src, aside.with_name(aside.name + suffix))
            log.critical("store %s is corrupt (%s): set aside as %s (kept); starting a fresh "
                         "store", self.path, exc, aside)
            fresh = _FreshStore(self.path)
            try:
                fresh.add_alerts([SimpleNamespace(
                    event_type="store_corrupt", severity="CRITICAL", room=None, value=None,
                    threshold=None, state="raised",
                    message=f"the store was corrupt ({exc}): set aside as {aside.name}, kept for "
                            "recovery; a fresh store was started")])
            finally:
                fresh.close()

    def close(self) -> None:
        """Close this thread's connection to the file."""
        self.db.close()

    @contextlib.contextmanager
    def transaction(self):
        """A write transaction under the store's write lock. Every transaction that writes
        takes the lock first: holding SQLite's write lock while waiting for the Python one
        (say, a @writes method called inside a bare ``db.atomic()``) would deadlock two
        threads."""
        with self._write_scope(), self.db.atomic():
            yield

    @contextlib.contextmanager
    def _write_scope(self):
        """The write lock; leaving the outermost write tells the listeners of this file to
        look again (``listen``): one hint a write, however many writes it nests."""
        depth = getattr(self._writing, "depth", 0)
        self._writing.depth = depth + 1
        try:
            with self._lock:
                yield
        finally:
            self._writing.depth = depth
            # inside a caller's bare transaction nothing is committed yet: no hint
            if depth == 0 and self.hints is not None and not self.db.in_transaction():
                self.hints.notify()

    def listen(self) -> wakeup.Listener | None:
        """A listener woken after each commit of any writing store on this file, in any
        process; None when hints cannot work here (poll ``data_version`` instead)."""
        return wakeup.listen(self.path)

    def data_version(self) -> int:
        """Changes whenever another connection commits: a free "anything new?" check."""
        return self.db.execute_sql("PRAGMA data_version").fetchone()[0]

    # -- identities ---------------------------------------------------------------------
    def reading_id(self, row_id: int) -> str:
        """Globally unique and stable (mash.ids): this file's uid and the row id."""
        return ids.reading_id(self.uid, row_id)

    def alert_id(self, row_id: int) -> str:
        """The id sinks know an alert row by."""
        return ids.alert_id(self.uid, row_id)

    # -- readings -----------------------------------------------------------------------
    def _fb_key(self, room: str, ts: dt.datetime) -> str:
        last = self._last_fb_key.get(room)
        if last is None:
            row = (self.m.SensorData.select(self.m.SensorData.fb_key)
                   .where(self.m.SensorData.room == room)
                   .order_by(self.m.SensorData.id.desc()).first())
            last = row.fb_key if row else ""
        key = ids.firebase_key(ts, last)
        if last and ids.firebase_key_order(key) <= ids.firebase_key_order(last):
            # The clock went back: this second may already hold an older reading's backup,
            # which must never be overwritten. Rare, so a scan is fine here.
            S = self.m.SensorData
            taken = [k for (k,) in S.select(S.fb_key).where(
                (S.room == room) & ((S.fb_key == key) | S.fb_key.startswith(key + "-"))).tuples()]
            if taken:
                key = ids.firebase_key(ts, max(taken, key=ids.firebase_key_order))
        self._last_fb_key[room] = key
        return key

    @writes
    def save_sensor_data(self, data: dict, timestamp: dt.datetime | float | None = None,
                         provisional: tuple[str, float] | None = None, simulated: bool = False,
                         sim_sync: bool = False) -> list[int]:
        """Store one reading line (``{"fruiting": {...}, "spawning": {...}}``) atomically
        and return the new row ids.

        Accepts the guide's shape (``temp``/``humidity``/``co2`` per room, optional
        top-level ``timestamp`` in epoch seconds). The reading ids it was given are put in
        ``data["reading_ids"]`` ({room: id}), so the guide's direct ``send_sensor_data`` of
        the same dict sends the same ids and the backend keeps the reading once.

        ``provisional``: ``(boot id, CLOCK_BOOTTIME)`` when the clock is not synchronized
        yet; the reading is held from every sink until ``rebase.rebase`` fixes its time.

        ``simulated``: the line came from the simulated board. It is marked so, and kept
        from every sink (``LOCAL``) unless ``sim_sync`` (SIM_SYNC=1): fake readings never
        reach the cloud under the real DEVICE_ID by accident."""
        ts = timestamp if timestamp is not None else data.get("timestamp")
        if isinstance(ts, (int, float)):
            ts = from_epoch(ts)
        ts = ts or utcnow()
        local = simulated and not sim_sync
        rows = []
        for room in ROOMS:
            values = data.get(room)
            if not isinstance(values, dict) or "temp" not in values:
                continue
            rows.append(dict(room=room, temperature=float(values["temp"]),
                             humidity=float(values["humidity"]), co2=int(values["co2"]),
                             timestamp=ts, fb_key=self._fb_key(room, ts),
                             boot=provisional[0] if provisional else None,
                             mono=provisional[1] if provisional else None,
                             simulated=int(simulated), synced=LOCAL if local else PENDING))
        if not rows:
            return []
        # One statement: atomic by itself (no nested savepoint inside a caller's
        # transaction), and SQLite numbers the rows of one INSERT consecutively.
        last = self.m.SensorData.insert_many(rows).execute()
        row_ids = list(range(last - len(rows) + 1, last + 1))
        data["reading_ids"] = {r["room"]: self.reading_id(i) for r, i in zip(rows, row_ids)}
        if provisional and self.clock_hold() is None:
            self.meta_set("clock_hold", row_ids[0])
        if local:
            self._skip_local()
        return row_ids

    def _skip_local(self) -> None:
        """Move the backend's and Firebase's progress markers past local-only readings when
        nothing a sink is owed lies before them: readings that are never sent must not hold
        a marker back (every later scan would start behind them). Normally the marker sits
        just before the rows stored now, so this looks at those rows only."""
        S, K = self.m.SensorData, self.m.SinkState
        last = self.last_reading_id()
        # only markers that exist: a sink never heard of keeps its "never seen" state
        for sink in K.select().where(K.name.in_(("backend", "firebase"))):
            progress = sink.progress or 0
            if progress >= last:
                continue
            owed = (S.synced == PENDING) if sink.name == "backend" else (S.synced != LOCAL)
            first = S.select(fn.MIN(S.id)).where((S.id > progress) & owed).scalar()
            new = first - 1 if first is not None else last
            if new > progress:
                K.update(progress=new).where(K.name == sink.name).execute()

    def clock_hold(self) -> int | None:
        """The first reading stamped before the clock was synchronized: no sink gets it, or
        anything after it, until it is rebased."""
        return self.meta_get("clock_hold")

    def _held(self, upto: int | None) -> int | None:
        hold = self.clock_hold()
        if hold is None:
            return upto
        return hold - 1 if upto is None else min(upto, hold - 1)

    def backend_progress(self) -> int:
        """Every reading id up to this one is synced, rejected or local only."""
        return self.sink("backend").progress or 0

    def unsynced(self, limit: int, after_id: int = 0, upto: int | None = None) -> list:
        """Up to ``limit`` pending readings past ``after_id`` (and the backend's progress
        marker), oldest first: a rowid range scan, no index needed. Local-only readings are
        not pending: they are never sent."""
        S = self.m.SensorData
        cond = (S.id > max(after_id, self.backend_progress())) & (S.synced == PENDING)
        upto = self._held(upto)
        if upto is not None:
            cond &= S.id <= upto
        return list(S.select().where(cond).order_by(S.id).limit(limit))

    def _advance_backend_progress(self) -> None:
        S = self.m.SensorData
        progress = self.backend_progress()
        first = S.select(fn.MIN(S.id)).where((S.id > progress) & (S.synced == PENDING)).scalar()
        new = first - 1 if first is not None else self.last_reading_id()
        if new != progress:
            self._upsert_sink("backend", progress=new)

    @writes
    def mark_synced(self, ids_: list[int]) -> int:
        """Mark readings accepted by the backend, count them (``sync_uploaded``) and move the
        progress marker, in one transaction; returns how many changed."""
        S = self.m.SensorData
        with self.transaction():
            n = (S.update(synced=SYNCED, synced_at=utcnow())
                 .where(S.id.in_(ids_) & (S.synced != SYNCED)).execute())
            self.incr("sync_uploaded", n)
            self._advance_backend_progress()
        return n

    @writes
    def mark_rejected(self, ids_: list[int], reason: str) -> None:
        """Mark readings the backend refused for good (kept, never deleted by retention)."""
        S = self.m.SensorData
        with self.transaction():
            S.update(synced=REJECTED).where(S.id.in_(ids_)).execute()
            self.incr("sync_rejected", len(ids_))
            self.meta_set("last_rejection", {"at": iso(utcnow()), "count": len(ids_),
                                             "first_id": min(ids_), "reason": reason[:500]})
            self._advance_backend_progress()

    @writes
    def retry_rejected(self) -> int:
        """Make refused readings pending again; returns how many."""
        S = self.m.SensorData
        with self.transaction():
            first = S.select(fn.MIN(S.id)).where(S.synced == REJECTED).scalar()
            n = S.update(synced=PENDING).where(S.synced == REJECTED).execute()
            if first is not None and first <= self.backend_progress():
                self._upsert_sink("backend", progress=first - 1)
        return n

    def readings_after(self, after_id: int, limit: int, upto: int | None = None) -> list:
        """Readings for a sink (Firebase, the live feed) with ids past ``after_id`` (up to
        ``upto``), oldest first; none held for the clock, none local only."""
        S = self.m.SensorData
        cond = (S.id > after_id) & (S.synced != LOCAL)
        upto = self._held(upto)
        if upto is not None:
            cond &= S.id <= upto
        return list(S.select().where(cond).order_by(S.id).limit(limit))

    def room_readings_after(self, room: str, after_id: int, limit: int,
                            upto: int | None = None) -> list:
        """One room's readings past ``after_id`` (up to ``upto``), oldest first, for a sink
        that takes them per sensor (the deployed MASH backend); none held for the clock,
        none local only, none refused."""
        S = self.m.SensorData
        cond = (S.room == room) & (S.id > after_id) & (S.synced != LOCAL) & (S.synced != REJECTED)
        upto = self._held(upto)
        if upto is not None:
            cond &= S.id <= upto
        return list(S.select().where(cond).order_by(S.id).limit(limit))

    @writes
    def mark_room_synced(self, room: str, upto: int) -> int:
        """Every pending reading of ``room`` up to ``upto`` is accepted (each of its sensors'
        progress has passed it): marked, counted (``sync_uploaded``), the backend's progress
        marker moved, in one transaction; returns how many changed."""
        S = self.m.SensorData
        with self.transaction():
            n = (S.update(synced=SYNCED, synced_at=utcnow())
                 .where((S.room == room) & (S.id <= upto) & (S.synced == PENDING)).execute())
            self.incr("sync_uploaded", n)
            self._advance_backend_progress()
        return n

    def last_reading_id(self) -> int:
        """The newest reading's row id, or 0 for an empty store."""
        return self.m.SensorData.select(fn.MAX(self.m.SensorData.id)).scalar() or 0

    def pending_count(self) -> int:
        """Readings the backend does not have yet (what the guide's query counts; local-only
        ones are not owed to it)."""
        S = self.m.SensorData
        return S.select().where((S.id > self.backend_progress()) & (S.synced == PENDING)).count()

    # -- process heartbeats -------------------------------------------------------------
    def beat(self, process: str, every: float, **info) -> None:
        """``process`` is alive (and says it beats every ``every`` s): ``mash status``,
        ``mash doctor`` and the worker's ERROR report read it."""
        self.meta_set(f"process.{process}", {"at": iso(utcnow()), "pid": os.getpid(),
                                             "every": every, "version": __version__, **info})

    def processes(self) -> dict:
        """Each process's last heartbeat, with ``alive`` (beat within three periods and not
        stopped) and ``age_s``."""
        KV = self.m.KeyValue
        now = utcnow()
        found = {}
        for row in KV.select().where(KV.key.startswith("process.")):
            beat = json.loads(row.value)
            at = dt.datetime.fromisoformat(beat["at"].rstrip("Z"))
            age = (now - at).total_seconds()
            beat["age_s"] = round(age, 1)
            beat["alive"] = not beat.get("stopped") and age < 3 * float(beat.get("every", 60))
            found[row.key[len("process."):]] = beat
        return found

    # -- counters and meta --------------------------------------------------------------
    @writes
    def incr(self, name: str, n: int = 1) -> None:
        """Atomically add ``n`` to the counter ``name`` (created at 0)."""
        C = self.m.Counter
        if n:
            (C.insert(name=name, value=n)
             .on_conflict(conflict_target=[C.name], update={C.value: C.value + n}).execute())

    def counters(self) -> dict[str, int]:
        """Every counter: bad lines by kind, rejected commands, uploads, retention."""
        return {c.name: c.value for c in self.m.Counter.select()}

    def meta_get(self, key: str, default=None):
        """The JSON value stored under ``key``, or ``default``."""
        row = self.m.KeyValue.get_or_none(self.m.KeyValue.key == key)
        return json.loads(row.value) if row else default

    @writes
    def meta_set(self, key: str, value) -> None:
        """Store ``value`` (JSON) under ``key``, replacing what was there."""
        self.m.KeyValue.replace(key=key, value=json.dumps(value)).execute()

    # -- alerts -------------------------------------------------------------------------
    @writes
    def add_alerts(self, events, now: dt.datetime | None = None) -> list[int]:
        """Store alert events and owe each to every sink, in one transaction; returns the
        alert row ids."""
        now = now or utcnow()
        made = []
        with self.transaction():
            routes = self.meta_get(NOTIFY_ROUTES)       # the worker's NOTIFY_URLS, hashed
            for e in events:
                alert = self.m.Alert.create(event_type=e.event_type, severity=e.severity,
                                            room=e.room, value=e.value, threshold=e.threshold,
                                            message=e.message, state=e.state, created_at=now)
                self.outbox.add(ALERT, alert.id, alert_payload(self.uid, alert), now=now)
                apps_outbox.owe_alert(self, alert)
                notify = notify_sinks_for(routes, alert.severity)
                if notify:
                    self.outbox.add(ALERT, alert.id, notify_payload(self.uid, alert),
                                    sinks=notify, now=now)
                made.append(alert.id)
        return made

    def latest_alert_ids(self) -> list[int]:
        """Each condition's (room, event_type) latest alert row: a scan of the ``alerts_key``
        index alone, over a table retention keeps to ALERT_KEEP (and these rows)."""
        A = self.m.Alert
        return [last for (last,) in A.select(fn.MAX(A.id)).group_by(A.room, A.event_type).tuples()]

    def active_alert_keys(self) -> set[tuple[str, str]]:
        """(room, event_type) whose latest alert is ``raised``: conditions still on.
        Retention never deletes a condition's latest row."""
        A = self.m.Alert
        return {(a.room, a.event_type) for a in
                A.select().where(A.id.in_(self.latest_alert_ids()) & (A.state == "raised"))}

    # -- the outbox (alerts and command outcomes owed to sinks) ------------------------------
    def owed(self, sink: str, limit: int = 100) -> list:
        """The oldest items ``sink`` is owed (``.kind``, ``.ref``, ``.message``)."""
        return self.outbox.pending(sink, limit)

    @writes
    def delivered(self, item_id: int, error: str | None = None) -> bool:
        """Atomically mark one outbox item done; False if it already was."""
        return self.outbox.done(item_id, error)

    @writes
    def delivered_many(self, item_ids: list[int], error: str | None = None,
                       now: dt.datetime | None = None) -> int:
        """Mark many outbox items done in one transaction; returns how many changed."""
        with self.transaction():
            return self.outbox.done_many(item_ids, error, now=now)

    @writes
    def delivered_each(self, marks: list[tuple[int, str | None]]) -> None:
        """Mark outbox items done, each with its own error (or None), in one transaction."""
        with self.transaction():
            for item_id, error in marks:
                self.outbox.done(item_id, error)

    def has_undelivered(self, urgent_only: bool = False, sinks=None) -> bool:
        """Anything owed to any sink (or to one of ``sinks``), a read, no write; see
        ``Outbox.owed``."""
        return self.outbox.owed(urgent_only, sinks)

    # -- sinks --------------------------------------------------------------------------
    def _upsert_sink(self, name: str, **values) -> None:
        S = self.m.SinkState
        (S.insert(name=name, **values)
         .on_conflict(conflict_target=[S.name],
                      update={getattr(S, k): v for k, v in values.items()}).execute())

    @writes
    def sink_ok(self, name: str, **extra) -> bool:
        """Record a success; True when the sink was offline before (a state change).

        An unchanged online state is rewritten at most every SINK_REFRESH s, not on every
        call: a 10 s command poll would otherwise cost a page write each time."""
        cached = self._sink_seen.get(name)
        if not extra and cached and cached[0] and time.monotonic() - cached[1] < self.SINK_REFRESH:
            return False
        self._sink_seen[name] = (True, time.monotonic())
        was_online = bool(self.sink(name).online)
        self._upsert_sink(name, online=1, last_ok=utcnow(), last_error=None, **extra)
        return not was_online

    @writes
    def sink_failed(self, name: str, error: str) -> bool:
        """Record a failure; True when the sink was online (or unknown) before."""
        self._sink_seen[name] = (False, time.monotonic())
        row = self.m.SinkState.get_or_none(self.m.SinkState.name == name)
        was_online = bool(row is None or row.online)
        if was_online or (row.last_error or "") != error[:500]:
            self._upsert_sink(name, online=0, last_error=error[:500])
        return was_online

    def sink(self, name: str):
        """The sink's row (``online``, ``last_ok``, ``last_error``, ``progress``); a blank
        offline one for a sink never heard of."""
        S = self.m.SinkState
        return S.get_or_none(S.name == name) or S(name=name, online=0, progress=0)

    # -- disk budget and stats (their own modules) -----------------------------------------
    def used_bytes(self) -> int:
        return retention.used_bytes(self)

    def age_out(self, now: dt.datetime | None = None) -> dict[str, int]:
        """Each chunk its own short write transaction: readings are never kept waiting."""
        return retention.age_out(self, now)

    @writes
    def enforce_budget(self, max_bytes: int, firebase_on: bool = False,
                       now: dt.datetime | None = None) -> dict:
        return retention.enforce_budget(self, max_bytes, firebase_on, now)

    def get_stats(self) -> dict:
        """The guide's stats, derived from the store so every process reports the same."""
        return stats.collect(self)


class _FreshStore(Store):
    """The store that replaces a corrupt one, made under the lock its maker holds."""

    def _open(self) -> None:
        self.db.connect(reuse_if_open=True)
        migrate(self.db, self.m)
        self.uid = ids.new_uid()
        self.meta_set("db_uid", self.uid)


DatabaseManager = Store
