"""What the worker's tasks do, as plain functions of a ``Runtime`` (tested without Huey).

Each job sweeps durable state in SQLite (unsynced readings, undelivered alerts, unacked
command outcomes) and marks an item done only after its sink confirmed it, so a job can be
killed at any point and simply run again. Retryable failures are raised for Huey to retry
with backoff; permanent ones are recorded and skipped so they never block what is behind.
"""
from __future__ import annotations

import json
import logging
import threading
import time

from mash.cloud.errors import PermanentError, RetryableError
from mash.cloud.firebase import FirebaseError
from mash.models import iso

log = logging.getLogger("mash.worker")

FIREBASE_BATCH = 500


def reading_json(store, row) -> dict:
    return {"id": store.reading_id(row.id), "room": row.room, "temperature": row.temperature,
            "humidity": row.humidity, "co2": row.co2, "timestamp": iso(row.timestamp)}


def _backend_call(rt, fn, *args, **kwargs):
    """Call the backend, keeping the sink's state in the store (for ``mash status``)."""
    try:
        result = fn(*args, **kwargs)
    except RetryableError as exc:
        if rt.store.sink_failed("backend", str(exc)):
            log.warning("backend unreachable: %s", exc)
        raise
    if rt.store.sink_ok("backend"):
        log.info("backend reachable")
    return result


def ensure_registered(rt) -> None:
    """Register the device once (a 409 means it already is)."""
    if rt.registered:
        return
    _backend_call(rt, rt.backend.register_device)
    rt.registered = True


def sync_readings(rt) -> int:
    """Upload every unsynced reading, oldest first, until none are left. Returns how many."""
    if rt.backend is None:
        return 0
    store, size = rt.store, rt.settings.batch_size
    ensure_registered(rt)
    started, sent, after = time.monotonic(), 0, 0
    failures, failed_last = [], False
    backlog = store.pending_count()
    # The backlog as it stands now: readings that arrive during the drain are the next run's,
    # or a steady stream would keep one run (and its session) going for ever.
    upto = store.last_reading_id()
    while True:
        # A large backlog goes in larger requests: a week offline must drain in minutes,
        # and per-request cost (latency, rate limit) dominates, not bytes.
        limit = max(size, rt.drain_batch) if backlog > 4 * size else size
        batch = store.unsynced(limit, after_id=after, upto=upto)
        if not batch:
            break
        ids = [r.id for r in batch]
        key = f"{store.uid}-{ids[0]}-{ids[-1]}-{len(ids)}"      # same batch, same key
        try:
            _backend_call(rt, rt.backend.upload_readings, [reading_json(store, r) for r in batch], key)
        except RetryableError as exc:
            # One failed batch does not stop the drain; the run ends by raising, so Huey's
            # retry picks the failed batch up. A 429, or failing twice in a row, stops now.
            failures.append(exc)
            if exc.status == 429 or len(failures) >= 2 and failed_last:
                raise
            failed_last = True
            after = ids[-1]
            continue
        except PermanentError as exc:
            if exc.status == 404 and rt.registered:      # the backend forgot the device
                rt.registered = False
                ensure_registered(rt)
                continue
            store.mark_rejected(ids, str(exc))
            log.error("backend refused %d readings (ids %d-%d): %s; they are kept and marked "
                      "rejected, the rest goes on", len(ids), ids[0], ids[-1], exc)
        else:
            store.mark_synced(ids)
            sent += len(ids)
        failed_last = False
        after = ids[-1]
        backlog = max(0, backlog - len(ids))
    if sent:
        took = time.monotonic() - started
        if sent >= 1000:
            log.info("backlog drained: %d readings in %.1f s (%.0f readings/s)", sent, took,
                     sent / max(took, 1e-6))
        else:
            log.debug("synced %d readings", sent)
        store.incr("sync_uploaded", sent)
    if failures:
        raise failures[-1]
    return sent


def backup_firebase(rt) -> int:
    """Copy readings past the Firebase progress marker, one multi-path update per batch."""
    fb = rt.firebase
    if fb is None or not fb.is_initialized:
        return 0
    store = rt.store
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


def poll_commands(rt) -> int:
    """Fetch the backend's command history; put new ``pending``/``sent`` ones in the ledger."""
    if rt.backend is None:
        return 0
    from mash.commands import intake
    ensure_registered(rt)
    commands = _backend_call(rt, rt.backend.fetch_commands)
    new = 0
    for cmd in reversed(commands):              # history is newest first; act oldest first
        if not isinstance(cmd, dict) or cmd.get("status") not in ("pending", "sent"):
            continue
        if intake(rt, cmd, "backend") in ("queued", "done", "failed"):
            new += 1
    return new


def _ack_response(cmd) -> dict:
    response = json.loads(cmd.response) if cmd.response else {}
    if cmd.reason:
        response["reason"] = cmd.reason
    return response


# One delivery of a kind at a time in a process, whoever calls (a queued task, the
# scheduler's sweep, the sync manager): two sweeps reading the same owed items before either
# marks them would send them twice. (Across processes the Huey task lock does this.)
_delivering = {"acks": threading.Lock(), "alerts": threading.Lock()}


def deliver_acks(rt) -> int:
    """Every final command status to both sinks, once each."""
    with _delivering["acks"]:
        return _deliver_acks(rt)


def _deliver_acks(rt) -> int:
    store = rt.store
    done = _send_pending(rt, store.unacked_commands("backend"),
                         lambda cmd: rt.backend.ack_command(cmd.command_id, cmd.status,
                                                            _ack_response(cmd), iso(cmd.finished_at)),
                         lambda cmd, error: store.command_acked(cmd.command_id, "backend", error),
                         lambda cmd: f"ack of command {cmd.command_id}")
    done += _publish_pending(rt, store.unacked_commands("mqtt"), "ack", lambda cmd, confirm:
                             rt.mqtt.publish_ack(cmd.command_id, cmd.status, _ack_response(cmd),
                                                 on_confirm=confirm),
                             lambda cmd: store.command_acked(cmd.command_id, "mqtt"),
                             lambda cmd: cmd.command_id)
    return done


def deliver_alerts(rt) -> int:
    """Raised and cleared alerts to the backend and MQTT, once per sink."""
    with _delivering["alerts"]:
        return _deliver_alerts(rt)


def _deliver_alerts(rt) -> int:
    store = rt.store

    def send(alert):
        event, severity = _alert_shape(alert)
        ensure_registered(rt)
        rt.backend.trigger_alert(event, alert.message, severity, alert.room, alert.value,
                                 alert.threshold, iso(alert.created_at))
    done = _send_pending(rt, store.undelivered_alerts("backend"), send,
                         lambda alert, error: store.alert_delivered(alert.id, "backend", error),
                         lambda alert: f"alert {store.alert_id(alert.id)}")

    def publish(alert, confirm):
        event, severity = _alert_shape(alert)
        return rt.mqtt.publish_alert(event, alert.message, severity, room=alert.room,
                                     alert_id=store.alert_id(alert.id),
                                     timestamp=iso(alert.created_at), on_confirm=confirm)
    done += _publish_pending(rt, store.undelivered_alerts("mqtt"), "alert", publish,
                             lambda a: store.alert_delivered(a.id, "mqtt"), lambda a: a.id)
    return done


def _send_pending(rt, items, send, mark, describe) -> int:
    """Send each owed item to the backend and mark it done. A permanent refusal (say a 404
    for a command the backend never knew, from MQTT) is marked done with the reason, not
    retried; a retryable failure propagates for Huey's retry."""
    done = 0
    for item in items:
        if rt.backend is None:
            mark(item, "backend not configured")
            continue
        try:
            _backend_call(rt, send, item)
        except PermanentError as exc:
            mark(item, str(exc)[:300])
            log.warning("backend refused the %s: %s", describe(item), exc)
            continue
        mark(item, None)
        done += 1
    return done


def _alert_shape(alert) -> tuple[str, str]:
    """A cleared condition is reported as ``<type>_cleared`` with severity INFO."""
    if alert.state == "cleared":
        return f"{alert.event_type}_cleared", "INFO"
    return alert.event_type, alert.severity


def _publish_pending(rt, items, what, publish, mark, key) -> int:
    """Publish items not yet confirmed; mark each when its PUBACK arrives (not before)."""
    if rt.mqtt is None:
        for item in items:
            mark(item)
        return 0
    if not rt.mqtt.is_alive():
        return 0
    sent = 0
    for item in items:
        k = (what, key(item))
        if k in rt.in_flight:
            continue
        rt.in_flight.add(k)

        def confirm(item=item, k=k):
            mark(item)
            rt.in_flight.discard(k)
        if not publish(item, confirm):
            rt.in_flight.discard(k)
            break
        sent += 1
    return sent


def heartbeat(rt) -> dict:
    """Status to every sink: backend PUT /devices/{id}, retained MQTT status, Firebase."""
    stats = rt.store.get_stats()
    if rt.backend is not None:
        try:
            ensure_registered(rt)
            _backend_call(rt, rt.backend.update_status, "ONLINE", stats)
        except (RetryableError, PermanentError) as exc:
            log.debug("status to backend failed: %s", exc)
    if rt.mqtt is not None and rt.mqtt.is_alive():
        rt.mqtt.publish_status("online", **stats)
        rt.store.sink_ok("mqtt")
    if rt.firebase is not None and rt.firebase.is_initialized:
        try:
            rt.firebase.update_status({"status": "online", "timestamp": time.time(), **stats})
            rt.store.sink_ok("firebase")
        except FirebaseError as exc:
            if rt.store.sink_failed("firebase", str(exc)):
                log.warning("Firebase unreachable: %s", exc)
    return stats
