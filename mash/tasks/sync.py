"""Readings out: the backend drain and the Firebase backup, each with its own progress.

Each job sweeps the store and marks readings done only after the sink confirmed them, so it
can be killed at any point and simply run again. What a failure means is decided in
``mash.sinks.errors``: when the sink failed (offline, rate limited, our credentials refused)
every reading stays owed and the error is raised for Huey to retry with backoff; when the
backend says the data is wrong, only the readings it refuses are set aside (``synced = -1``,
with its reason), so they never block what is behind.
"""
from __future__ import annotations

import logging
import threading
import time

from mash import ids
from mash.alerts import AlertEvent
from mash.clock import iso, utcnow
from mash.sinks.errors import (AuthError, BadRequest, DeviceUnknown, NotAllowed, NotFound,
                               PermanentError, RateLimited, RetryableError, TooLarge)
from mash.sinks.backend_api import match_sensors, sensor_name
from mash.sinks.firebase import FirebaseError
from mash.contract import MASH_BATCH, MASH_METRICS, MAX_READINGS_PER_REQUEST, ROOMS

log = logging.getLogger("mash.worker")

FIREBASE_BATCH = 500
AUTH_ALERT = "backend_auth"
# CRITICAL: it does not mend itself when the password was rotated or the account locked, and
# until a person acts nothing reaches the backend and no remote command arrives (the store
# keeps everything, and the climate control goes on).
AUTH_ALERT_SEVERITY = "CRITICAL"
_auth_alert_lock = threading.Lock()     # the worker's two threads may both meet the 401


def backend_call(ctx, fn, *args, **kwargs):
    """Call the backend, keeping the sink's state in the store (``mash status``) and the
    ``backend_auth`` alert: raised once when the backend refuses our credentials, cleared by
    the first answer after a login works again. The client itself logs the one line per
    change of state (online / offline / credentials refused)."""
    try:
        result = fn(*args, **kwargs)
    except RetryableError as exc:
        if ctx.store.sink_failed("backend", str(exc)):
            log.debug("backend recorded offline: %s", exc)
        if isinstance(exc, AuthError):
            _auth_alert(ctx, True, exc)
        raise
    if ctx.store.sink_ok("backend"):
        log.debug("backend recorded online")
    _auth_alert(ctx, False)
    ctx.note_backend_time()
    return result


def _auth_alert(ctx, refused: bool, exc: AuthError | None = None) -> None:
    """Raise or clear ``backend_auth`` on a change (a store read once per process to learn
    whether an earlier run left it raised, then ``ctx.auth_alert`` remembers)."""
    if getattr(ctx, "auth_alert", None) is refused:
        return                              # no change: no read, no write
    with _auth_alert_lock:
        _auth_alert_change(ctx, refused, exc)


def _auth_alert_change(ctx, refused: bool, exc: AuthError | None) -> None:
    raised = getattr(ctx, "auth_alert", None)
    if raised is None:
        raised = (None, AUTH_ALERT) in ctx.store.active_alert_keys()
    if refused and not raised:
        ctx.store.add_alerts([AlertEvent(
            AUTH_ALERT, AUTH_ALERT_SEVERITY, None, exc.status, None, "raised",
            f"the backend refuses the device's credentials ({exc}): readings, alerts and acks "
            "wait in the store until a login works again")])
        raised = True
    elif not refused and raised:
        ctx.store.add_alerts([AlertEvent(AUTH_ALERT, AUTH_ALERT_SEVERITY, None, None, None,
                                         "cleared", "the backend accepts the device's "
                                                    "credentials again")])
        raised = False
    ctx.auth_alert = raised


IDENTITY = "backend.identity"       # meta: the deployed backend's device for us, or why none


def ensure_registered(ctx) -> None:
    """Register the device once per process (a 409 means it already is). Under the deployed
    MASH backend this learns the device's id there; while that backend has no device with our
    serial (a person must create it) it raises DeviceUnknown without asking again until
    ``REGISTER_RETRY`` has passed, and ``meta.backend.identity`` says why (``mash status``,
    ``mash doctor``): one log line when this state begins and one when it ends."""
    if ctx.registered:
        return
    backend = ctx.backend
    if backend.profile.name == "guide":
        backend_call(ctx, backend.register_device)
        ctx.registered = True
        return
    with _register_lock:         # the worker's two threads: one registration, one log line
        if not ctx.registered:
            _register_mash(ctx, backend)


_register_lock = threading.Lock()


def _register_mash(ctx, backend) -> None:
    store, now = ctx.store, time.monotonic()
    known = store.meta_get(IDENTITY) or {}
    if getattr(ctx, "identity_retry_at", 0.0) > now:
        raise DeviceUnknown(known.get("problem") or "device not registered", None,
                            ctx.identity_retry_at - now)
    try:
        device = backend_call(ctx, backend.register_device)
    except DeviceUnknown as exc:
        ctx.identity_retry_at = now + (exc.retry_after or 300.0)
        if known.get("problem") != str(exc):
            log.error("%s; every reading stays owed, asking the backend again every %.0f "
                      "minutes", exc, (exc.retry_after or 300.0) / 60)
            store.meta_set(IDENTITY, {"state": "unknown", "serial": ctx.settings.device_id,
                                      "problem": str(exc), "since": iso(utcnow())})
        raise
    if known.get("cuid") != device["id"] or known.get("state") != "registered":
        if known.get("state") == "unknown":
            log.info("the backend knows device %s now (its id %s): uploads start",
                     ctx.settings.device_id, device["id"])
        store.meta_set(IDENTITY, {"state": "registered", "serial": ctx.settings.device_id,
                                  "cuid": device["id"], "since": iso(utcnow())})
    on_registered = getattr(ctx, "on_registered", None)
    if on_registered is not None:
        on_registered(device["id"])
    ctx.registered = True


def reading_json(store, row) -> dict:
    return {"id": store.reading_id(row.id), "room": row.room, "temperature": row.temperature,
            "humidity": row.humidity, "co2": row.co2, "timestamp": iso(row.timestamp)}


class _Drain:
    """One run's state: the request size (halved by a 413, for the rest of the run), whether
    the device was registered again (at most once per run), what was refused."""

    def __init__(self, ctx):
        self.ctx, self.store = ctx, ctx.store
        self.size = min(ctx.settings.batch_size, MAX_READINGS_PER_REQUEST)
        self.large = min(max(self.size, ctx.drain_batch), MAX_READINGS_PER_REQUEST)
        self.cap = MAX_READINGS_PER_REQUEST
        self.reregistered = False
        self.sent = 0
        self.rejected: list[tuple[int, str]] = []

    def limit(self, backlog: int) -> int:
        return min(self.cap, self.large if backlog > 4 * self.size else self.size)

    def send(self, rows) -> None:
        """Upload ``rows`` in requests of at most ``cap``; a 413 halves the request, a
        400/422 bisects it until the refused readings are isolated (each then marked
        rejected with the backend's reason). Anything else propagates."""
        i = 0
        while i < len(rows):
            part = rows[i:i + self.cap]
            self._send_part(part)
            i += len(part)

    def _send_part(self, rows) -> None:
        readings = [reading_json(self.store, r) for r in rows]
        try:
            backend_call(self.ctx, self.ctx.backend.upload_readings, readings,
                         ids.batch_key([r["id"] for r in readings]))
        except TooLarge as exc:
            if len(rows) == 1:
                return self._reject(rows[0], exc)
            half = (len(rows) + 1) // 2
            if self.cap > half:
                log.info("backend refused %d readings in one request as too large (413); "
                         "sending at most %d at a time for the rest of this run", len(rows), half)
                self.cap = half
            return self.send(rows)
        except BadRequest as exc:
            if len(rows) == 1:
                return self._reject(rows[0], exc)
            half = (len(rows) + 1) // 2
            self._send_part(rows[:half])
            self._send_part(rows[half:])
            return None
        self.store.mark_synced([r.id for r in rows])
        self.sent += len(rows)
        return None

    def _reject(self, row, exc: PermanentError) -> None:
        self.store.mark_rejected([row.id], str(exc))
        self.rejected.append((row.id, str(exc)))

    def report(self) -> None:
        """One line for what the backend refused in this run, however many."""
        if self.rejected:
            first_id, reason = self.rejected[0]
            log.error("backend refused %d reading(s) (first: row %d: %s); they are kept and "
                      "marked rejected, the rest goes on", len(self.rejected), first_id, reason)


def sync_readings(ctx) -> int:
    """Upload the backlog as it stands now, oldest first. Returns how many were accepted.

    Readings that arrive during the drain are the next run's, or a steady stream would keep
    one run going for ever. A large backlog goes in larger requests (``drain_batch``): per
    request cost (latency, the rate limit) dominates, not bytes; no request carries more
    than the backend takes (``MAX_READINGS_PER_REQUEST``). One failed batch (offline) does
    not stop the drain; the run ends by raising so Huey's retry picks it up. A 429, our
    credentials refused, or two failures in a row, stop it at once. A 404 (the backend
    forgot the device) registers it again once per run; a second 404 ends the run with
    every reading still owed."""
    if ctx.backend is None:
        return 0
    if ctx.backend.profile.name == "mash":
        return sync_sensors(ctx)
    store = ctx.store
    ensure_registered(ctx)
    run = _Drain(ctx)
    started, after = time.monotonic(), 0
    failures, failed_last = [], False
    backlog = store.pending_count()
    upto = store.last_reading_id()
    try:
        while True:
            batch = store.unsynced(run.limit(backlog), after_id=after, upto=upto)
            if not batch:
                break
            try:
                run.send(batch)
            except AuthError:
                raise                       # cannot talk now: every reading stays owed
            except RetryableError as exc:
                failures.append(exc)
                if isinstance(exc, RateLimited) or len(failures) >= 2 and failed_last:
                    raise
                failed_last = True
                after = batch[-1].id
                continue
            except NotFound as exc:
                if not _register_again(ctx, run, exc):
                    break
                continue                    # the same batch (less what went through) again
            except PermanentError as exc:   # the request itself is wrong, not these readings
                if store.sink_failed("backend", str(exc)):
                    log.error("backend refuses the upload itself (%s); the readings stay owed", exc)
                break
            failed_last = False
            after = batch[-1].id
            backlog = max(0, backlog - len(batch))
    finally:
        run.report()
    if run.sent and getattr(ctx, "uploads_gone", False):
        log.info("backend takes uploads again")
        ctx.uploads_gone = False
    if run.sent >= 1000:
        took = time.monotonic() - started
        log.info("backlog drained: %d readings in %.1f s (%.0f readings/s)", run.sent, took,
                 run.sent / max(took, 1e-6))
    if failures:
        raise failures[-1]
    return run.sent


def _register_again(ctx, run: _Drain, exc: NotFound) -> bool:
    """After a 404 to an upload: register the device again, once per run. False when that
    was done already or did not help: the run ends, the readings stay owed, and the next
    run (``SYNC_INTERVAL``) tries once more. One log line when this state begins
    (``ctx.uploads_gone``), one when an upload goes through again."""
    gone = getattr(ctx, "uploads_gone", False)
    if not run.reregistered:
        run.reregistered = True
        ctx.registered = False
        (log.debug if gone else log.warning)(
            "backend answered 404 to an upload (%s); registering the device again", exc)
        try:
            ensure_registered(ctx)
            return True
        except NotFound as again:
            exc = again
    ctx.store.sink_failed("backend", f"404 after registering again: {exc}")
    if not gone:
        log.error("backend answers 404 to uploads even after registering the device again (%s); "
                  "the readings stay owed, tried again once per sync run", exc)
        ctx.uploads_gone = True
    return False


# -- the deployed MASH backend: readings per sensor (CONTRACT §9) ---------------------------
SENSORS_MISSING = "backend.sensors_missing"   # meta: (room, metric)s with no sensor, and why
INFLIGHT = "backend.inflight"                 # meta: {sensor key: [first, last]} sent, unanswered


def sensor_key(room: str, metric: str) -> str:
    """The sink row whose ``progress`` is this sensor's: every reading id up to it is there."""
    return f"backend:{room}:{metric}"


def ensure_sensors(ctx) -> dict[tuple[str, str], str]:
    """``{(room, metric): sensor id}`` for the device (``match_sensors``'s naming rule),
    creating the missing ones when the account may. What is still missing is recorded in
    ``meta.backend.sensors_missing`` with the reason (``mash status``), logged once; its
    readings stay owed."""
    backend, store = ctx.backend, ctx.store
    sensors = match_sensors(backend_call(ctx, backend.list_sensors))
    problem = None
    for room in ROOMS:
        for metric in MASH_METRICS:
            if (room, metric) in sensors or problem:
                continue
            try:
                sensors[(room, metric)] = backend_call(ctx, backend.create_sensor, room, metric)["id"]
                log.info("created the backend sensor %r for device %s", sensor_name(room, metric),
                         ctx.settings.device_id)
            except NotAllowed as exc:
                problem = str(exc)
    missing = [sensor_name(r, m) for r in ROOMS for m in MASH_METRICS if (r, m) not in sensors]
    known = store.meta_get(SENSORS_MISSING) or {}
    state = {"missing": missing, "problem": problem} if missing else {}
    if state != known:
        if missing:
            log.error("the backend account may not create sensors (%s): ask the MASH admin to "
                      "create the sensors %s on device %s; their readings stay owed", problem,
                      ", ".join(repr(n) for n in missing), ctx.settings.device_id)
        else:
            log.info("every sensor of device %s is on the backend", ctx.settings.device_id)
        store.meta_set(SENSORS_MISSING, state)
    return sensors


def sync_sensors(ctx) -> int:
    """The drain for the deployed MASH backend: each (room, metric) to its sensor with
    ``POST /sensors/:id/data/batch``, round-robin over the sensors so the per-URL budget
    (``mash.pacing``) keeps every sensor going. The backend does not dedupe, so each
    sensor's progress is a sink row (``sensor_key``), moved in the transaction that follows
    the 201: a batch is never sent again once its answer came. Before each send the batch is
    written down as in flight; a batch resent while still in flight (its last attempt got no
    answer: a timeout, a dropped connection, the worker killed) may be stored twice: its
    readings are counted (``sync_resent_unanswered``). A room's readings are marked synced
    once all its sensors have them (``pending_count``, retention)."""
    store, backend = ctx.store, ctx.backend
    ensure_registered(ctx)
    sensors = ensure_sensors(ctx)
    upto = store.last_reading_id()
    progress = {k: store.sink(sensor_key(*k)).progress or 0 for k in sensors}
    sent = 0
    active = sorted(sensors)
    while active:
        for key in list(active):
            room, metric = key
            rows = store.room_readings_after(room, progress[key], MASH_BATCH, upto=upto)
            if not rows:
                active.remove(key)
                continue
            progress[key] = _send_sensor_batch(ctx, key, sensors[key], rows)
            sent += len(rows)
    for room in ROOMS:
        marks = [progress.get((room, m)) for m in MASH_METRICS]
        if None not in marks:
            store.mark_room_synced(room, min(marks))
    return sent


def _send_sensor_batch(ctx, key: tuple[str, str], sensor_id: str, rows) -> int:
    """One batch to one sensor; returns the sensor's new progress. A 400 for one reading
    sets it aside (rejected, with the reason); a larger refused batch is halved."""
    store, (room, metric) = ctx.store, key
    path = f"/sensors/{sensor_id}/data/batch"
    inflight = store.meta_get(INFLIGHT) or {}
    before = inflight.get(sensor_key(*key))
    if before and before[1] >= rows[0].id:
        resent = sum(1 for r in rows if before[0] <= r.id <= before[1])
        store.incr("sync_resent_unanswered", resent)
        log.warning("resending %d %s reading(s) whose last upload got no answer: the backend "
                    "may now hold them twice (it does not dedupe)", resent, sensor_key(*key))
    inflight[sensor_key(*key)] = [rows[0].id, rows[-1].id]
    store.meta_set(INFLIGHT, inflight)
    items = [{"value": getattr(r, metric), "timestamp": iso(r.timestamp)} for r in rows]
    try:
        backend_call(ctx, ctx.backend.upload_sensor_batch, sensor_id, items)
    except (TooLarge, BadRequest) as exc:
        _settle(store, key, None)
        if len(rows) == 1:
            store.mark_rejected([rows[0].id], f"{metric}: {exc}")
            return _settle(store, key, rows[0].id)
        half = len(rows) // 2
        _send_sensor_batch(ctx, key, sensor_id, rows[:half])
        return _send_sensor_batch(ctx, key, sensor_id, rows[half:])
    except RetryableError as exc:
        if not (exc.maybe_delivered and exc.request == ("POST", path)):
            _settle(store, key, None)       # it never left, or the backend answered no
        raise
    return _settle(store, key, rows[-1].id)


def _settle(store, key: tuple[str, str], progress: int | None) -> int | None:
    """The batch in flight for ``key`` is answered: its progress (when it went through) and
    the in-flight note go in one transaction."""
    with store.transaction():
        if progress is not None:
            store.sink_ok(sensor_key(*key), progress=progress)
        inflight = store.meta_get(INFLIGHT) or {}
        if inflight.pop(sensor_key(*key), None) is not None:
            store.meta_set(INFLIGHT, inflight)
    return progress


def backup_firebase(ctx) -> int:
    """Copy readings past the Firebase progress marker, one multi-path update per batch."""
    fb = ctx.firebase
    if fb is None or not fb.is_initialized or not fb.guide:   # apps only: firebase_apps
        return 0
    store = ctx.store
    progress = store.sink("firebase").progress or 0
    upto = store.last_reading_id()          # as in sync_readings: this run's backlog only
    written = 0
    while True:
        rows = store.readings_after(progress, FIREBASE_BATCH, upto=upto)
        if not rows:
            break
        try:
            fb.write_readings([{"room": r.room, "key": r.fb_key, "temperature": r.temperature,
                                "humidity": r.humidity, "co2": r.co2} for r in rows])
        except FirebaseError as exc:      # never the readings' fault: they stay owed
            if store.sink_failed("firebase", str(exc)):
                log.warning("Firebase unreachable: %s", exc)
            raise RetryableError(str(exc), exc.status) from exc
        progress = rows[-1].id
        if store.sink_ok("firebase", progress=progress):
            log.info("Firebase reachable")
        written += len(rows)
    return written


def sync_due(ctx) -> bool:
    """Anything for the backend drain (a read, no write)."""
    return ctx.backend is not None and ctx.store.pending_count() > 0


def backup_due(ctx) -> bool:
    return (ctx.firebase is not None and
            ctx.store.last_reading_id() > (ctx.store.sink("firebase").progress or 0))
