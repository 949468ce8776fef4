"""``mash export``: readings out of the store as CSV or JSON lines, streamed.

Rows are read in id order, a few thousand at a time (keyset pagination: each chunk is a
short read, so the reader keeps writing meanwhile and memory stays flat for a million rows),
and written as they come. Each row says where it stands: ``sync_status`` is ``synced``,
``pending``, ``rejected`` (the backend refused it), ``local`` (a simulated board's, never
sent) or ``held`` (stamped before the clock was synchronized), and ``firebase`` whether the
backup has it.

    from mash.export import export
    export(store, open("june.csv", "w"), start=datetime(2026, 6, 1), fmt="csv")
"""
from __future__ import annotations

import csv
import datetime as dt
import json
from typing import IO, Iterator

from mash.clock import iso
from mash.contract import ROOMS
from mash.models import LOCAL, PENDING, REJECTED, SYNCED, Store

FIELDS = ("reading_id", "room", "timestamp", "temperature", "humidity", "co2",
          "sync_status", "synced_at", "firebase")
FORMATS = ("csv", "jsonl")
CHUNK = 5000
_STATUS = {PENDING: "pending", SYNCED: "synced", REJECTED: "rejected", LOCAL: "local"}


def rows(store: Store, start: dt.datetime | None = None, end: dt.datetime | None = None,
         room: str | None = None, chunk: int = CHUNK) -> Iterator[dict]:
    """Readings with ``start <= timestamp < end`` (naive UTC), oldest id first."""
    if room is not None and room not in ROOMS:
        raise ValueError(f"room must be one of {', '.join(ROOMS)}")
    S = store.m.SensorData
    cond = []
    if start is not None:
        cond.append(S.timestamp >= start)
    if end is not None:
        cond.append(S.timestamp < end)
    if room is not None:
        cond.append(S.room == room)
    fb = store.sink("firebase")
    fb_progress = (fb.progress if fb else 0) or 0
    last = 0
    while True:
        where = S.id > last
        for c in cond:
            where &= c
        batch = list(S.select(S.id, S.room, S.timestamp, S.temperature, S.humidity, S.co2,
                              S.synced, S.synced_at, S.mono)
                     .where(where).order_by(S.id).limit(chunk).tuples())
        for (rid, rroom, ts, temp, hum, co2, synced, synced_at, mono) in batch:
            yield {"reading_id": store.reading_id(rid), "room": rroom, "timestamp": iso(ts),
                   "temperature": temp, "humidity": hum, "co2": co2,
                   "sync_status": "held" if mono is not None else _STATUS.get(synced, str(synced)),
                   "synced_at": iso(synced_at),
                   "firebase": rid <= fb_progress and synced != LOCAL}
        if len(batch) < chunk:
            return
        last = batch[-1][0]


def export(store: Store, out: IO[str], start=None, end=None, room=None, fmt: str = "csv") -> int:
    """Write the rows to ``out`` as ``csv`` (with a header) or ``jsonl``; returns how many."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}")
    n = 0
    if fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=FIELDS, lineterminator="\n")
        writer.writeheader()
        for row in rows(store, start, end, room):
            writer.writerow(row)
            n += 1
    else:
        for row in rows(store, start, end, room):
            out.write(json.dumps(row) + "\n")
            n += 1
    out.flush()
    return n


def parse_when(value: str | None) -> dt.datetime | None:
    """``2026-11-27``, ``2026-11-27T10:00`` or a full ISO 8601 time; naive means UTC."""
    if value is None:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{value!r} is not a date or time like 2026-11-27 or "
                         "2026-11-27T10:00:00Z") from None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return parsed
