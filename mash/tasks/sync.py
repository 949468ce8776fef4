"""Readings out: the backend drain and the Firebase backup, each with its own progress.

Each job sweeps the store and marks readings done only after the sink confirmed them, so it
can be killed at any point and simply run again. Retryable failures are raised for Huey to
retry with backoff; permanent ones are recorded and skipped so they never block what is
behind.
"""
from __future__ import annotations

import logging
import time

from mash import ids
from mash.clock import iso
from mash.cloud.errors import PermanentError, RetryableError
from mash.cloud.firebase import FirebaseError

log = logging.getLogger("mash.worker")

FIREBASE_BATCH = 500


def backend_call(ctx, fn, *args, **kwargs):
    """Call the backend, keeping the sink's state in the store (``mash status``). The client
    itself logs the one line per change of state (online / offline)."""
    try:
        result = fn(*args, **kwargs)
    except RetryableError as exc:
        if ctx.store.sink_failed("backend", str(exc)):
            log.debug("backend recorded offline: %s", exc)
        raise
    if ctx.store.sink_ok("backend"):
        log.debug("backend recorded online")
    ctx.note_backend_time()
    return result


def ensure_registered(ctx) -> None:
    """Register the device once per process (a 409 means it already is)."""
    if ctx.registered:
        return
    backend_call(ctx, ctx.backend.register_device)
    ctx.registered = True


def reading_json(store, row) -> dict:
    return {"id": store.reading_id(row.id), "room": row.room, "temperature": row.temperature,
            "humidity": row.humidity, "co2": row.co2, "timestamp": iso(row.timestamp)}


def sync_readings(ctx) -> int:
    """Upload the backlog as it stands now, oldest first. Returns how many were accepted.

    Readings that arrive during the drain are the next run's, or a steady stream would keep
    one run going for ever. A large backlog goes in larger requests (``drain_batch``): per
    request cost (latency, the rate limit) dominates, not bytes. One failed batch does not
    stop the drain; the run ends by raising so Huey's retry picks it up. A 429, or two
    failures in a row, stop it at once."""
    if ctx.backend is None:
        return 0
    store, size = ctx.store, ctx.settings.batch_size
    ensure_registered(ctx)
    started, sent, after = time.monotonic(), 0, 0
    failures, failed_last = [], False
    backlog = store.pending_count()
    upto = store.last_reading_id()
    while True:
        limit = max(size, ctx.drain_batch) if backlog > 4 * size else size
        batch = store.unsynced(limit, after_id=after, upto=upto)
        if not batch:
            break
        row_ids = [r.id for r in batch]
        readings = [reading_json(store, r) for r in batch]
        try:
            backend_call(ctx, ctx.backend.upload_readings, readings,
                         ids.batch_key([r["id"] for r in readings]))
        except RetryableError as exc:
            failures.append(exc)
            if exc.status == 429 or len(failures) >= 2 and failed_last:
                raise
            failed_last = True
            after = row_ids[-1]
            continue
        except PermanentError as exc:
            if exc.status == 404 and ctx.registered:      # the backend forgot the device
                ctx.registered = False
                ensure_registered(ctx)
                continue
            store.mark_rejected(row_ids, str(exc))
            log.error("backend refused %d readings (ids %d-%d): %s; they are kept and marked "
                      "rejected, the rest goes on", len(row_ids), row_ids[0], row_ids[-1], exc)
        else:
            store.mark_synced(row_ids)
            sent += len(row_ids)
        failed_last = False
        after = row_ids[-1]
        backlog = max(0, backlog - len(row_ids))
    if sent:
        took = time.monotonic() - started
        if sent >= 1000:
            log.info("backlog drained: %d readings in %.1f s (%.0f readings/s)", sent, took,
                     sent / max(took, 1e-6))
    if failures:
        raise failures[-1]
    return sent


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
        except FirebaseError as exc:
            if store.sink_failed("firebase", str(exc)):
                log.warning("Firebase unreachable: %s", exc)
            raise RetryableError(str(exc)) from exc
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
