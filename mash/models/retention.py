"""The disk budget (``MAX_DB_MB``): delete the oldest readings every sink already has.

Unsynced readings, undelivered alerts and the command ledger are never deleted here; when
they alone exceed the budget the result says ``over`` and the reader raises the alarm.
Freed pages are reused by new rows, so the file stops growing rather than shrinking.
"""
from __future__ import annotations

from mash.models.schema import LOCAL, SYNCED


def used_bytes(store) -> int:
    """Bytes of the file in use (pages minus the free list; WAL excluded)."""
    pragma = lambda name: store.db.execute_sql(f"PRAGMA {name}").fetchone()[0]  # noqa: E731
    return (pragma("page_count") - pragma("freelist_count")) * pragma("page_size")


def enforce_budget(store, max_bytes: int, firebase_on: bool = False, chunk: int = 2000) -> dict:
    """Keep ``store`` under ``max_bytes``; returns ``{used_mb, max_mb, over, deleted}``.

    Deletes only readings synced to the backend (and backed up to Firebase when it is on)
    or local only (a simulated board's, never sent), never the newest row (row ids must
    never be reused)."""
    S = store.m.SensorData
    used = used_bytes(store)
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
             "over": used > max_bytes, "deleted": deleted}
    if store.meta_get("storage", {}).get("over") != state["over"] or deleted:
        store.meta_set("storage", {k: v for k, v in state.items() if k != "deleted"})
    return state
