"""Readings stamped before the clock was synchronized, moved to wall time once it is.

A Pi has no RTC: until NTP (or the backend's ``Date``) answers, the wall clock may be days
out. The reader then stamps each reading with ``CLOCK_BOOTTIME`` and the boot id, and every
sink is held back from the first such reading on (``Store.clock_hold``). When sync arrives,
``base`` (wall time = base + boottime, for this boot) fixes them exactly. Readings of an
earlier boot that never saw sync (a power cut first) cannot be fixed exactly: they are
placed to end just before this boot began, keeping their spacing, and counted
(``clock_estimated``).
"""
from __future__ import annotations

import datetime as dt
from itertools import groupby

from mash.clock import from_epoch


def rebase(store, boot: str, base: float) -> dict:
    """Give every held reading its wall time, its Firebase key again, and release the hold,
    in one transaction. Returns ``{"rebased": n, "estimated": m}``."""
    S = store.m.SensorData
    with store.transaction():
        hold = store.clock_hold()
        if hold is None:
            return {"rebased": 0, "estimated": 0}
        rows = list(S.select(S.id, S.room, S.mono, S.boot)
                    .where((S.id >= hold) & S.mono.is_null(False)).order_by(S.id))
        stamps: dict[int, dt.datetime] = {}
        anchor = base                      # this boot's start, in wall time
        estimated = 0
        groups = [(b, list(g)) for b, g in groupby(rows, key=lambda r: r.boot)]
        for b, group in reversed(groups):  # newest boot first, each ending before the next
            if b == boot:
                for r in group:
                    stamps[r.id] = from_epoch(base + r.mono)
                continue
            last = group[-1].mono
            for r in group:
                stamps[r.id] = from_epoch(anchor - 1.0 - (last - r.mono))
            anchor = anchor - 1.0 - last
            estimated += len(group)
        store._last_fb_key.clear()
        first = rows[0].id if rows else hold
        for room in {r.room for r in rows}:      # keys follow the room's last settled one
            prev = (S.select(S.fb_key).where((S.room == room) & (S.id < first))
                    .order_by(S.id.desc()).first())
            store._last_fb_key[room] = prev.fb_key if prev else ""
        for r in rows:
            ts = stamps[r.id]
            S.update(timestamp=ts, fb_key=store._fb_key(r.room, ts), mono=None,
                     boot=None).where(S.id == r.id).execute()
        store.m.KeyValue.delete().where(store.m.KeyValue.key == "clock_hold").execute()
        store._last_fb_key.clear()
        if estimated:
            store.incr("clock_estimated", estimated)
    return {"rebased": len(rows), "estimated": estimated}
