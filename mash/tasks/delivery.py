"""Alerts and command outcomes to the sinks: one sweep over the store's outbox.

Every item is owed once to each sink. The backend is told with a request and the item is
marked done on its 2xx; MQTT is told with a QoS 1 publish and the item is marked done when
the broker's PUBACK arrives (paho keeps unconfirmed messages in memory only, so SQLite is
the durable copy). A permanent refusal (a 404 for a command the backend never knew) is
recorded, not retried; a retryable failure propagates for Huey's retry.

One sweep at a time across processes (the Huey lock the caller holds); a delivery asked for
while one runs makes the running sweep go round again instead of waiting (``sweep``).
"""
from __future__ import annotations

import functools
import logging

from huey.exceptions import TaskLockedException

from mash.cloud.errors import PermanentError
from mash.models import ACK, ALERT
from mash.tasks.notify import deliver_notifications
from mash.tasks.sync import backend_call, ensure_registered

log = logging.getLogger("mash.worker")

MAX_ROUNDS = 20


def sweep(ctx, lock) -> int:
    """Deliver until nothing is owed that can be sent now; returns how many were sent."""
    total = 0
    while True:
        try:
            with lock:
                for _ in range(MAX_ROUNDS):
                    ctx.deliver_again.clear()
                    done = deliver_owed(ctx)
                    total += done
                    if not done and not ctx.deliver_again.is_set():
                        break
                record_confirmed(ctx)
        except TaskLockedException:
            ctx.deliver_again.set()       # the running sweep picks this up
            return total
        if not ctx.deliver_again.is_set():   # asked for between our last pass and unlock?
            return total


def deliver_owed(ctx) -> int:
    """One pass over what each sink is owed."""
    record_confirmed(ctx)
    return deliver_notifications(ctx) + _to_backend(ctx) + _to_mqtt(ctx)   # never raises: first


def record_confirmed(ctx) -> int:
    """Mark the items the broker confirmed since the last pass done, in one transaction."""
    ids = ctx.take_confirmed()
    if ids:
        ctx.store.delivered_many(ids)
    return len(ids)


def _to_backend(ctx) -> int:
    store, done = ctx.store, 0
    owed = store.owed("backend")
    if ctx.backend is None:
        if owed:
            store.delivered_many([item.id for item in owed], "backend not configured")
        return len(owed)
    marks = []            # recorded together at the end of the pass: one commit, not one each
    try:
        for item in owed:
            try:
                backend_call(ctx, _send, ctx, item)
            except PermanentError as exc:
                marks.append((item.id, str(exc)[:300]))
                if not item.ref.startswith("auto-"):    # the backend never knows those
                    log.warning("backend refused the %s %s: %s", item.kind, item.ref, exc)
                continue
            marks.append((item.id, None))
            done += 1
    finally:
        if marks:
            store.delivered_each(marks)
    return done


def _send(ctx, item) -> None:
    m = item.message
    if item.kind == ACK:
        ctx.backend.ack_command(m["id"], m["status"], m["response"], m["timestamp"])
    elif item.kind == ALERT:
        ensure_registered(ctx)
        ctx.backend.trigger_alert(m["type"], m["message"], m["severity"], m["room"],
                                  m["value"], m["threshold"], m["timestamp"])


def _to_mqtt(ctx) -> int:
    store, mqtt = ctx.store, ctx.mqtt
    if mqtt is None:
        owed = store.owed("mqtt")
        if owed:
            store.delivered_many([item.id for item in owed], "MQTT not configured")
        return len(owed)
    if not mqtt.is_alive():
        return 0
    sent = 0
    owed = store.owed("mqtt")
    ctx.forget_settled({item.id for item in owed})
    for item in owed:
        if not ctx.claim_publish(item.id):
            continue

        confirm = functools.partial(ctx.publish_confirmed, item.id)
        m = item.message
        if item.kind == ACK:
            ok = mqtt.publish_ack(m["id"], m["status"], m["response"], on_confirm=confirm)
        else:
            ok = mqtt.publish_alert(m["type"], m["message"], m["severity"], room=m["room"],
                                    alert_id=m["id"], timestamp=m["timestamp"],
                                    on_confirm=confirm)
        if not ok:
            ctx.publish_failed(item.id)
            break
        sent += 1
    return sent
