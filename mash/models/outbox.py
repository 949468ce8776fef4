"""One outbox for everything a sink is owed: alerts and command outcomes alike.

An item is written once per sink in the same transaction as the fact it reports (the alert
row, the command's final status), with its message fixed at that moment. Delivery reads what
a sink is owed, sends it, and marks it done only after the sink confirmed it: a crash in
between sends it again (at least once), never loses it.
"""
from __future__ import annotations

import datetime as dt
import json

from mash import ids
from mash.clock import iso, utcnow
from mash.models.schema import ACK, ALERT, OUTBOX_SINKS


def alert_payload(uid: str, alert) -> dict:
    """What every sink is told of an alert row (a cleared condition is ``<type>_cleared``,
    severity INFO)."""
    cleared = alert.state == "cleared"
    return {"id": ids.alert_id(uid, alert.id), "room": alert.room,
            "type": f"{alert.event_type}_cleared" if cleared else alert.event_type,
            "severity": "INFO" if cleared else alert.severity, "message": alert.message,
            "value": alert.value, "threshold": alert.threshold,
            "timestamp": iso(alert.created_at)}


def ack_payload(cmd) -> dict:
    """A command's final status, as both sinks are told it."""
    response = json.loads(cmd.response) if cmd.response else {}
    if cmd.reason:
        response["reason"] = cmd.reason
    return {"id": cmd.command_id, "status": cmd.status, "response": response,
            "timestamp": iso(cmd.finished_at)}


class Outbox:
    def __init__(self, models):
        self.m = models

    def add(self, kind: str, ref: str, payload: dict, sinks=OUTBOX_SINKS,
            now: dt.datetime | None = None) -> None:
        """Owe ``payload`` to each sink. Call inside the transaction that records the fact."""
        now = now or utcnow()
        body = json.dumps(payload, separators=(",", ":"))
        self.m.Outbox.insert_many([dict(kind=kind, ref=str(ref), sink=sink, payload=body,
                                        created_at=now) for sink in sinks]).execute()

    def pending(self, sink: str, limit: int = 100) -> list:
        """The oldest items ``sink`` is still owed, each with ``.message`` (the payload)."""
        rows = list(self.m.Outbox.select()
                    .where((self.m.Outbox.sink == sink) & self.m.Outbox.done_at.is_null())
                    .order_by(self.m.Outbox.id).limit(limit))
        for row in rows:
            row.message = json.loads(row.payload)
        return rows

    def done(self, item_id: int, error: str | None = None,
             now: dt.datetime | None = None) -> bool:
        """Mark one item delivered (or refused for good, with ``error``); False if it
        already was."""
        return bool(self.m.Outbox.update(done_at=now or utcnow(), error=error)
                    .where((self.m.Outbox.id == item_id) & self.m.Outbox.done_at.is_null())
                    .execute())

    def done_many(self, item_ids: list[int], error: str | None = None,
                  now: dt.datetime | None = None) -> int:
        """Mark items delivered; returns how many were not already. Plain SQL, 500 ids a
        statement: a sweep marks hundreds at once, and peewee's per-value work would cost
        more than the update."""
        stamp, changed = str(now or utcnow()), 0     # str(): the text peewee stores a time as
        for k in range(0, len(item_ids), 500):
            chunk = [int(i) for i in item_ids[k:k + 500]]
            changed += self.m.Outbox._meta.database.execute_sql(
                f"UPDATE outbox SET done_at = ?, error = ? WHERE done_at IS NULL AND id IN "
                f"({', '.join(['?'] * len(chunk))})", [stamp, error, *chunk]).rowcount
        return changed

    def owed(self, urgent_only: bool = False, sinks=None) -> bool:
        """Anything owed to any sink (or to one of ``sinks``), a read, no write; with
        ``urgent_only``, anything but the acks of the climate controller's own commands,
        which wait for the next sweep (one delivery for several switches: fewer SD-card
        writes). Index-only either way (``outbox_owed``, ``outbox_urgent``): a sink that
        owes thousands of acks does not make every scheduler tick read them."""
        sql, params = "SELECT 1 FROM outbox WHERE done_at IS NULL", []
        if urgent_only:     # the very text of the outbox_urgent index's condition
            sql += f" AND substr(ref, 1, {len(ids.AUTO_PREFIX)}) <> '{ids.AUTO_PREFIX}'"
        if sinks is not None:
            sinks = list(sinks)
            if not sinks:
                return False
            # unary +: no index on sink, so the urgent case stays on outbox_urgent
            sql += f" AND {'+' if urgent_only else ''}sink IN ({', '.join(['?'] * len(sinks))})"
            params += sinks
        return self.m.Outbox._meta.database.execute_sql(sql + " LIMIT 1", params).fetchone() is not None

    def owed_count(self, kind: str) -> int:
        """How many items of ``kind`` some sink is still owed (the owed rows only, through
        ``outbox_owed``)."""
        return (self.m.Outbox.select(self.m.Outbox.ref).distinct()
                .where((self.m.Outbox.kind == kind) & self.m.Outbox.done_at.is_null()).count())


__all__ = ["Outbox", "alert_payload", "ack_payload", "ALERT", "ACK"]
