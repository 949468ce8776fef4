"""Alerts and command outcomes to the sinks: one sweep over the store's outbox.

Every item is owed once to each sink. The backend is told with a request and the item is
marked done on its 2xx; MQTT is told with a QoS 1 publish and the item is marked done when
the broker's PUBACK arrives (paho keeps unconfirmed messages in memory only, so SQLite is
the durable copy). What a failure means is decided in ``mash.sinks.errors``: the backend
saying the item is wrong (400/413/422, a 404 for a command it never knew) is recorded, not
retried; the sink failing (offline, rate limited, our credentials refused) leaves every item
owed and propagates for Huey's retry, after MQTT had its turn. A sink that is not configured
is owed its items until it is: nothing is dropped, and ``due`` does not count them, so the
scheduler does not enqueue deliveries for a sink that is off.

One sweep at a time across processes (the Huey lock the caller holds); a delivery asked for
while one runs makes the running sweep go round again instead of waiting (``sweep``).
"""
from __future__ import annotations

import functools
import logging

from huey.exceptions import TaskLockedException

from mash.sinks.errors import BackendError, NotFound, PermanentError
from mash.models import ACK, ALERT
from mash.tasks.firebase_apps import apps_on, deliver_firebase
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
    """One pass over what each sink is owed. A backend failure does not hold MQTT back: it
    is raised after MQTT's turn."""
    record_confirmed(ctx)
    notified = deliver_notifications(ctx)      # first, and never raises: the phone hears
    try:                                        # of a crisis while the cloud is down
        done = _to_backend(ctx)
    except BackendError as exc:
        _to_mqtt(ctx)
        deliver_firebase(ctx)
        raise exc from None
    return notified + done + _to_mqtt(ctx) + deliver_firebase(ctx)


def sinks_to_sweep(ctx) -> tuple[str, ...]:
    """The sinks a sweep can deliver to now: configured (and MQTT connected: its reconnect
    wakes the sweep), each notification URL among them."""
    notifier = getattr(ctx, "notifier", None)
    return tuple(name for name, on in (("backend", ctx.backend is not None),
                                       ("mqtt", ctx.mqtt is not None and ctx.mqtt.is_alive()),
                                       ("firebase", apps_on(ctx)))
                 if on) + tuple(notifier.sinks if notifier else ())


def due(ctx, urgent_only: bool = False) -> bool:
    """Is anything owed to a sink the sweep can deliver to now? (a read; the scheduler's
    ``deliver`` check). Items owed to a sink that is off wait, uncounted here."""
    sinks = sinks_to_sweep(ctx)
    return bool(sinks) and ctx.store.has_undelivered(urgent_only=urgent_only, sinks=sinks)


def record_confirmed(ctx) -> int:
    """Mark the items the broker confirmed since the last pass done, in one transaction."""
    ids = ctx.take_confirmed()
    if ids:
        ctx.store.delivered_many(ids)
    return len(ids)


def _to_backend(ctx) -> int:
    store, done = ctx.store, 0
    if ctx.backend is None:
        return 0                # owed until the backend is configured
    owed = store.owed("backend")
    profile = ctx.backend.profile
    takes = {ACK: profile.acks, ALERT: profile.alerts}
    if not all(takes.values()):
        # the deployed MASH backend has no route for outcomes or alerts (CONTRACT §9): they
        # are settled as such (the ledger, MQTT and Firebase carry them), not left owed
        skipped = [(item.id, f"no {item.kind} route on this backend") for item in owed
                   if not takes.get(item.kind, True)]
        if skipped:
            store.delivered_each(skipped)
            owed = [item for item in owed if takes.get(item.kind, True)]
    marks = []            # recorded together at the end of the pass: one commit, not one each
    reregistered = False
    try:
        i = 0
        while i < len(owed):
            item = owed[i]
            try:
                backend_call(ctx, _send, ctx, item)
            except NotFound as exc:
                if item.kind == ALERT:      # the backend forgot the device
                    if reregistered:
                        log.error("backend answers 404 to alerts even after registering the "
                                  "device again (%s); they stay owed", exc)
                        break
                    log.warning("backend answered 404 to an alert (%s); registering the device "
                                "again", exc)
                    reregistered, ctx.registered = True, False
                    continue                # the same item again (_send registers first)
                _refused(marks, item, exc)  # an ack of a command the backend never knew
            except PermanentError as exc:   # the item itself is wrong: recorded, not retried
                _refused(marks, item, exc)
            else:
                marks.append((item.id, None))
                done += 1
            i += 1
    finally:
        if marks:
            store.delivered_each(marks)
    return done


LOCAL_COMMAND_PREFIXES = ("auto-", "local-", "fb-")


def _refused(marks: list, item, exc: PermanentError) -> None:
    marks.append((item.id, str(exc)[:300]))
    # the backend never issued the controller's, the dashboard's or the apps' commands: its
    # 404 to their acks is expected (recorded, not retried), not worth a warning each
    if not (item.kind == ACK and item.ref.startswith(LOCAL_COMMAND_PREFIXES)):
        log.warning("backend refused the %s %s: %s", item.kind, item.ref, exc)


def _send(ctx, item) -> None:
    m = item.message
    ensure_registered(ctx)      # else the backend's 404 (device unknown) reads as "command unknown"
    if item.kind == ACK:
        ctx.backend.ack_command(m["id"], m["status"], m["response"], m["timestamp"])
    elif item.kind == ALERT:
        ctx.backend.trigger_alert(m["type"], m["message"], m["severity"], m["room"],
                                  m["value"], m["threshold"], m["timestamp"])


def _to_mqtt(ctx) -> int:
    store, mqtt = ctx.store, ctx.mqtt
    if mqtt is None or not mqtt.is_alive():      # owed until configured and connected
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
