"""The MASH apps' Firebase layout (CONTRACT §8), the parts that run as jobs: the hourly
aggregates from the store, and the relay and alert items of the outbox.

- ``backup_aggregates`` (each backup pass): readings into their hour's sums
  (``mash.models.aggregates``), then every hour whose count changed since it was written:
  the current hour each pass, a finished one once more when its last readings land, any
  hour again when late ones do (a drain, a rebase), and on the first run every hour the
  store holds, oldest first, ``AGG_BATCH`` hours per update, paced.
- ``deliver_firebase`` (the delivery sweep): ``latest_actuators``, ``actuator_logs``,
  ``alerts`` and ``notifications``, one multi-path update per pass; the items carry their
  keys, so a re-send after a crash overwrites itself.
"""
from __future__ import annotations

import logging
import threading
import time

from mash.clock import parse_iso, to_epoch
from mash.sinks import firebase as fb
from mash.sinks.errors import RetryableError
from mash.sinks.firebase import FirebaseError
from mash.models import aggregates, apps_outbox
from mash.models.schema import FB_ALERT, FB_RELAY

log = logging.getLogger("mash.worker")

AGG_BATCH = 100        # hours per update (~30 KB)
PACE = 0.2             # s between the updates of a backfill


def apps_on(ctx) -> bool:
    return ctx.firebase is not None and ctx.firebase.is_initialized and ctx.firebase.apps


def announce(ctx) -> None:
    """Tell every process (the reader records relays and alerts) whether the apps' layout is
    owed those events: a flag in the store, written only when it changes; with it on, owe
    the relays' states as they are now."""
    want = apps_on(ctx)
    with ctx.store.transaction():
        if bool(ctx.store.meta_get(apps_outbox.FLAG)) != want:
            ctx.store.meta_set(apps_outbox.FLAG, want)
        if want:
            apps_outbox.owe_snapshot(ctx.store)


def say_offline(ctx, wait: float = 3.0) -> None:
    """A clean stop: §8's status says ``OFFLINE`` (one short try: a stop never waits on a dead
    uplink)."""
    if ctx.firebase is None or not ctx.firebase.is_initialized:
        return
    stats = ctx.stats()

    def send():
        try:
            ctx.firebase.update_status(fb.status_object("OFFLINE", stats))
        except FirebaseError as exc:
            log.info("could not tell Firebase OFFLINE: %s", exc)
    t = threading.Thread(target=send, name="firebase-offline", daemon=True)
    t.start()
    t.join(wait)


def _failed(ctx, exc: FirebaseError):
    if ctx.store.sink_failed("firebase", str(exc)):
        log.warning("Firebase unreachable: %s", exc)
    raise RetryableError(str(exc)) from exc


def aggregates_due(ctx) -> bool:
    """Readings not yet summed, or hours not yet written (reads, no write)."""
    return apps_on(ctx) and (aggregates.behind(ctx.store) or bool(aggregates.owed(ctx.store, 1)))


def backup_aggregates(ctx) -> int:
    """Sum what is new, then write every hour owed; returns how many hours were written.
    Nothing is written until the sums have caught up with the store, so a finished hour is
    never written half-summed (a kill mid-backfill repeats identical content only)."""
    if not apps_on(ctx):
        return 0
    store, serial = ctx.store, ctx.settings.device_id
    aggregates.accumulate(store, include_simulated=getattr(ctx.settings, "sim_sync", False))
    written = 0
    while True:
        rows = aggregates.owed(store, AGG_BATCH)
        if not rows:
            break
        if written:
            time.sleep(PACE)               # a backfill: leave the database room to breathe
        updates = {fb.aggregate_path(serial, r.room, aggregates.hour_start(r)): aggregates.value(r)
                   for r in rows}
        try:
            ctx.firebase.update(updates)
        except FirebaseError as exc:
            _failed(ctx, exc)
        aggregates.mark_written(store, rows)
        if store.sink_ok("firebase"):
            log.info("Firebase reachable")
        written += len(rows)
    if written > AGG_BATCH:
        log.info("Firebase: %d hourly aggregates written", written)
    if not ctx.firebase.guide:
        # apps only: Firebase "has" a reading once it is in a written hour (mash status's
        # lag, and what retention may delete)
        done = aggregates.progress(store)
        if (store.sink("firebase").progress or 0) != done:
            store.sink_ok("firebase", progress=done)
    return written


def item_updates(serial: str, item) -> dict:
    """One outbox item's paths and values (``None``: delete)."""
    m = item.message
    at = parse_iso(m["at"])
    stamp = {"timestamp": m["at"], "timestamp_unix": int(to_epoch(at))}
    if item.kind == FB_RELAY:
        latest = {fb.apps_path("latest_actuators", serial): fb.actuators_object(m["states"], at)}
        if m["actuator"] is None:                  # a snapshot: no change to log
            return latest
        key = f"{fb.time_key(at)}_{m['actuator']}"
        return {fb.apps_path("latest_actuators", serial): fb.actuators_object(m["states"], at),
                fb.apps_path("actuator_log", serial, key=key):
                    fb.actuator_log(m["actuator"], m["state"], m["source"], at)}
    if item.kind == FB_ALERT:
        key = f"{m['room']}_{m['type']}"
        common = {"room": m["room"], "alert_type": m["type"], "severity": m["severity"],
                  "message": m["message"], **stamp}
        note_key = f"{fb.time_key(at)}_{m['id']}"
        return {
            fb.apps_path("alert", serial, key=key):
                {"id": key, **common, "is_acknowledged": False, "active": True,
                 "updated_at": m["at"]} if m["raised"] else None,
            fb.apps_path("notification", serial, key=note_key):
                {"id": note_key, "device_id": serial, **common,
                 "event_type": "alert_raised" if m["raised"] else "alert_resolved",
                 "active": m["raised"], "read": False}}
    return {}


def deliver_firebase(ctx) -> int:
    """The delivery sweep's Firebase part: what the apps are owed of relays and alerts, in
    one update, oldest first (a later relay's ``latest_actuators`` wins)."""
    store = ctx.store
    owed = store.owed("firebase", 200)
    if not owed:
        return 0
    if not apps_on(ctx):        # kept owed until it is on again (or retention needs the room)
        return 0
    updates: dict = {}
    for item in owed:
        updates.update(item_updates(ctx.settings.device_id, item))
    try:
        ctx.firebase.update(updates)
    except FirebaseError as exc:
        _failed(ctx, exc)
    store.delivered_many([i.id for i in owed])
    return len(owed)
