"""The disk budget (``MAX_DB_MB``) and the age-out that keeps every table bounded.

``age_out`` (the reader, hourly): what has served its purpose leaves, whatever the budget.

- A delivered outbox row, OUTBOX_KEEP after delivery (the alert or command row keeps the fact).
- A final command, AUTO_COMMAND_KEEP after it finished when the climate controller made it
  (nobody else knows its id), COMMAND_KEEP otherwise; never while one of its acks is owed,
  never while the backend's last poll listed it as pending or sent: the poll puts a listed id
  missing from the ledger in again and the board would switch a second time (docs/DESIGN.md,
  "The disk budget").
- An alert, ALERT_KEEP after it was made, never a condition's latest row (the reader rebuilds
  the active conditions from them) nor one still owed.
- Never a table's newest row: SQLite hands out max(rowid)+1, and ids are never reused.

Each table is walked from its oldest row by primary key (a range scan, no index) and the walk
stops at the first row too young to go: a run reads what it deletes and what is held back
(owed, listed, a condition's latest), not the table. Deletes go in chunks, one short
transaction each.

``enforce_budget`` (the reader, every minute): over the budget, first what a sink has been
owed for OWED_STALE (its sink has been unreachable or unconfigured that long; counted in
``outbox_dropped.<sink>``), then the oldest readings every sink has. Unsynced readings, items
owed for less than OWED_STALE and the command ledger are never deleted here: when they alone
exceed the budget the result says ``over`` and the reader raises the alarm. Freed pages are
reused by new rows, so the file stops growing rather than shrinking.
"""
from __future__ import annotations

import datetime as dt

from mash.clock import utcnow
from mash.models.schema import ACK, ALERT, FINAL, LOCAL, SYNCED

OUTBOX_KEEP = dt.timedelta(days=1)          # a delivered outbox row
AUTO_COMMAND_KEEP = dt.timedelta(days=1)    # a final command of the climate controller
COMMAND_KEEP = dt.timedelta(days=30)        # a final command from the backend, MQTT, the grower
ALERT_KEEP = dt.timedelta(days=7)           # an alert (the backend keeps the history)
OWED_STALE = dt.timedelta(days=7)           # owed this long: the first to go for room
FUTURE = dt.timedelta(days=1)               # a stamp further ahead of now is a clock gone wrong
CHUNK = 500
AUTO_SOURCE = "auto"


def used_bytes(store) -> int:
    """Bytes of the file in use (pages minus the free list; WAL excluded)."""
    pragma = lambda name: store.db.execute_sql(f"PRAGMA {name}").fetchone()[0]  # noqa: E731
    return (pragma("page_count") - pragma("freelist_count")) * pragma("page_size")


def _text(ts: dt.datetime) -> str:
    """A time as the timestamp columns hold it: peewee's text, which sorts as time does, so
    the walks compare the stored strings and parse none."""
    return str(ts)


def _young(ts: str | None, cutoff: str, future: str) -> bool:
    """Too young to go: stamped at or after ``cutoff``. A stamp past ``future`` (FUTURE
    ahead of now) was made by a clock that was wrong, and counts as old."""
    return ts is not None and cutoff <= ts <= future


def _walk(store, table: str, key: str, columns: str, cutoff: str, future: str, chunk: int):
    """Batches of up to ``chunk`` ``(key, stamp, ...)`` rows (``columns`` after the key, the
    stamp first), oldest key first, up to the first row whose stamp is too young to go. Rows
    are stepped through one at a time, so none past that one is read."""
    sql = f"SELECT {key}, {columns} FROM {table} WHERE {key} > ? ORDER BY {key}"
    after = 0
    while True:
        cursor = store.db.execute_sql(sql, (after,))
        batch, young = [], False
        for row in cursor:
            if _young(row[1], cutoff, future):
                young = True
                break
            batch.append(row)
            if len(batch) == chunk:
                break
        cursor.close()                   # before the caller deletes from the table
        if batch:
            yield batch
            after = batch[-1][0]
        if young or len(batch) < chunk:
            return


def _in(values) -> str:
    return f"({', '.join(['?'] * len(values))})"


def _owed_refs(store, kind: str, refs: list[str]) -> set[str]:
    """Which of ``refs`` some sink is still owed (the owed rows only: ``outbox_owed``)."""
    if not refs:
        return set()
    return {ref for (ref,) in store.db.execute_sql(
        f"SELECT ref FROM outbox WHERE done_at IS NULL AND kind = ? AND ref IN {_in(refs)}",
        [kind, *refs]).fetchall()}


def _delete(store, table: str, key: str, doomed: list) -> int:
    if doomed:
        with store.transaction():
            store.db.execute_sql(f"DELETE FROM {table} WHERE {key} IN {_in(doomed)}", doomed)
    return len(doomed)


def _newest(store, table: str, key: str) -> int | None:
    return store.db.execute_sql(f"SELECT MAX({key}) FROM {table}").fetchone()[0]


def _age_outbox(store, now: dt.datetime, chunk: int) -> int:
    cutoff, future = _text(now - OUTBOX_KEEP), _text(now + FUTURE)
    newest = _newest(store, "outbox", "id")
    deleted = 0
    for batch in _walk(store, "outbox", "id", "created_at, done_at", cutoff, future, chunk):
        deleted += _delete(store, "outbox", "id", [
            item_id for item_id, _, done_at in batch
            if done_at is not None and not _young(done_at, cutoff, future) and item_id != newest])
    return deleted


def _age_commands(store, now: dt.datetime, chunk: int) -> int:
    keep = {True: _text(now - AUTO_COMMAND_KEEP), False: _text(now - COMMAND_KEEP)}
    future = _text(now + FUTURE)
    newest = _newest(store, "commands", "seq")
    listed = store.backend_listed()
    deleted = 0
    for batch in _walk(store, "commands", "seq",
                       "received_at, command_id, source, status, finished_at",
                       max(keep.values()), future, chunk):
        doomed = {command_id: seq for seq, received, command_id, source, status, finished
                  in batch
                  if status in FINAL and seq != newest and command_id not in listed
                  and not _young(finished or received, keep[source == AUTO_SOURCE], future)}
        for command_id in _owed_refs(store, ACK, list(doomed)):
            del doomed[command_id]
        deleted += _delete(store, "commands", "seq", list(doomed.values()))
    return deleted


def _age_alerts(store, now: dt.datetime, chunk: int) -> int:
    latest = set(store.latest_alert_ids())
    deleted = 0
    for batch in _walk(store, "alerts", "id", "created_at", _text(now - ALERT_KEEP),
                       _text(now + FUTURE), chunk):
        doomed = {str(alert_id): alert_id for alert_id, _ in batch if alert_id not in latest}
        for ref in _owed_refs(store, ALERT, list(doomed)):
            del doomed[ref]
        deleted += _delete(store, "alerts", "id", list(doomed.values()))
    return deleted


def age_out(store, now: dt.datetime | None = None, chunk: int = CHUNK) -> dict[str, int]:
    """Delete what has served its purpose (the module docstring's rules); returns how many
    rows left each table: ``{"outbox", "commands", "alerts"}``."""
    now = now or utcnow()
    return {"outbox": _age_outbox(store, now, chunk),
            "commands": _age_commands(store, now, chunk),
            "alerts": _age_alerts(store, now, chunk)}


def _oldest_owed(store, sink: str, limit: int) -> list[tuple[int, str]]:
    return store.db.execute_sql(
        "SELECT id, created_at FROM outbox WHERE sink = ? AND done_at IS NULL ORDER BY id "
        "LIMIT ?", (sink, limit)).fetchall()


def _drop_stale_owed(store, max_bytes: int, used: int, now: dt.datetime,
                     chunk: int) -> tuple[int, dict[str, int]]:
    """Delete items owed for OWED_STALE, the oldest first whichever sink is owed them, until
    the store is under ``max_bytes``; returns ``(used bytes, {sink: dropped})``."""
    cutoff, future = _text(now - OWED_STALE), _text(now + FUTURE)
    newest = _newest(store, "outbox", "id")
    dropped: dict[str, int] = {}
    while used > max_bytes:
        heads = {sink: _oldest_owed(store, sink, 1) for sink in store.outbox.owed_sinks("")}
        stale = [(rows[0][0], sink) for sink, rows in heads.items()
                 if rows and not _young(rows[0][1], cutoff, future) and rows[0][0] != newest]
        if not stale:
            break
        _, sink = min(stale)
        doomed = []
        for item_id, created in _oldest_owed(store, sink, chunk):
            if _young(created, cutoff, future) or item_id == newest:
                break
            doomed.append(item_id)
        with store.transaction():
            _delete(store, "outbox", "id", doomed)
            store.incr(f"outbox_dropped.{sink}", len(doomed))
        dropped[sink] = dropped.get(sink, 0) + len(doomed)
        used = used_bytes(store)
    return used, dropped


def enforce_budget(store, max_bytes: int, firebase_on: bool = False,
                   now: dt.datetime | None = None, chunk: int = 2000) -> dict:
    """Keep ``store`` under ``max_bytes``; returns ``{used_mb, max_mb, over, deleted,
    dropped}`` (``dropped``: ``{sink: owed items deleted}``).

    First the items a sink has been owed for OWED_STALE, then readings synced to the backend
    (and backed up to Firebase when it is on) or local only (a simulated board's, never
    sent), never the newest row (row ids must never be
    reused)."""
    S = store.m.SensorData
    now = now or utcnow()
    used = used_bytes(store)
    dropped: dict[str, int] = {}
    if used > max_bytes:
        used, dropped = _drop_stale_owed(store, max_bytes, used, now, CHUNK)
    deleted = 0
    newest = store.last_reading_id()
    limit_id = store.sink("firebase").progress if firebase_on else newest
    while used > max_bytes:
        doomed = [r.id for r in S.select(S.id)
                  .where(S.synced.in_((SYNCED, LOCAL)) & (S.id < newest) & (S.id <= limit_id))
                  .order_by(S.id).limit(chunk)]
        if not doomed:
            break
        with store.transaction():
            S.delete().where(S.id.in_(doomed)).execute()
        deleted += len(doomed)
        used = used_bytes(store)
    if deleted:
        store.incr("retention_deleted", deleted)
    state = {"used_mb": round(used / 2**20, 1), "max_mb": round(max_bytes / 2**20, 1),
             "over": used > max_bytes, "deleted": deleted, "dropped": dropped}
    if store.meta_get("storage", {}).get("over") != state["over"] or deleted or dropped:
        store.meta_set("storage", {k: v for k, v in state.items()
                                   if k not in ("deleted", "dropped")})
    return state
