"""What the MASH apps' Firebase layout is owed of relays and alerts (CONTRACT §8), as outbox
items for the sink ``firebase``, written in the transaction that records the fact.

Each item carries its own Firebase keys and objects, fixed when the event is recorded, so a
re-send overwrites itself. Owed only while the worker says the apps' layout is on (the
``firebase_apps`` flag it sets at start): a gateway without it writes nothing extra.
"""
from __future__ import annotations

from mash import ids
from mash.clock import iso, utcnow
from mash.models.schema import FB_ALERT, FB_RELAY

FLAG = "firebase_apps"
SINK = ("firebase",)


def wanted(store) -> bool:
    return bool(store.meta_get(FLAG))


def owe_relay(store, actuator: str, state: str, source: str) -> None:
    """A relay changed: its ``actuator_logs`` entry and the new ``latest_actuators``."""
    if not wanted(store):
        return
    at = utcnow()
    states = {a: row["state"] for a, row in store.actuator_states().items()}
    states[actuator] = state
    # the climate controller's switches wait for the delivery sweep (several in one update)
    ref = f"{ids.AUTO_PREFIX}{actuator}" if source == "auto" else actuator
    store.outbox.add(FB_RELAY, ref, {"actuator": actuator, "state": state, "source": source,
                                     "at": iso(at), "states": states}, sinks=SINK)


def owe_snapshot(store) -> None:
    """Every relay as it is (``latest_actuators`` only, no log entry): a worker starting with
    the apps' layout on says it once, so the apps show the relays before the first switch."""
    states = {a: row["state"] for a, row in store.actuator_states().items()}
    store.outbox.add(FB_RELAY, "snapshot", {"actuator": None, "states": states,
                                            "at": iso(utcnow())}, sinks=SINK)


def owe_alert(store, alert) -> None:
    """An alert raised or cleared: the ``alerts`` entry set or deleted, and a notification."""
    if not wanted(store):
        return
    store.outbox.add(FB_ALERT, alert.id, {
        "id": store.alert_id(alert.id), "room": alert.room or "device", "type": alert.event_type,
        "severity": alert.severity, "message": alert.message, "raised": alert.state == "raised",
        "at": iso(alert.created_at)}, sinks=SINK)
