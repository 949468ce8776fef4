"""Status out: the heartbeat to every sink (backend device status, retained MQTT status,
Firebase)."""
from __future__ import annotations

import datetime as dt
import logging

from mash.clock import parse_iso, utcnow
from mash.cloud.errors import PermanentError, RetryableError
from mash.cloud.firebase import FirebaseError, status_object
from mash.tasks.sync import backend_call, ensure_registered

log = logging.getLogger("mash.worker")


BOARD_LOST_ERROR_AFTER = 300.0      # s without the board before the backend hears ERROR


def device_status(processes: dict, now: dt.datetime) -> tuple[str, str | None]:
    """``("ONLINE", None)``, or ``("ERROR", why)`` when the reader has been gone or the board
    lost for five minutes (CONTRACT §2, ``PUT /devices/{id}``)."""
    reader = processes.get("reader")
    if reader is None:
        return "ONLINE", None
    if not reader["alive"] and reader["age_s"] >= BOARD_LOST_ERROR_AFTER:
        return "ERROR", f"reader not running since {reader['at']}"
    board = reader.get("board") or {}
    since = parse_iso(board.get("since"))
    if not board.get("connected") and since is not None and \
            (now - since).total_seconds() >= BOARD_LOST_ERROR_AFTER:
        return "ERROR", f"board lost since {board['since']}: {board.get('problem') or 'unknown'}"
    return "ONLINE", None


def heartbeat(ctx) -> dict:
    """Status to every sink; a sink that fails is recorded, never raised (its next beat is
    the retry)."""
    ctx.store.beat("worker", ctx.intervals["heartbeat"])
    stats = ctx.stats()
    state, why = device_status(stats["processes"], utcnow())
    if state != ctx.device_state:
        if state == "ERROR":
            log.error("device status ERROR: %s", why)
        elif ctx.device_state == "ERROR":
            log.info("device status back to ONLINE")
        ctx.device_state = state
    if ctx.backend is not None:
        try:
            ensure_registered(ctx)
            backend_call(ctx, ctx.backend.update_status, state,
                         {**stats, **({"error": why} if why else {})})
        except (RetryableError, PermanentError) as exc:
            log.debug("status to backend failed: %s", exc)
    if ctx.mqtt is not None and ctx.mqtt.is_alive():
        ctx.mqtt.publish_status("online", **stats)
        ctx.store.sink_ok("mqtt")
    if ctx.firebase is not None and ctx.firebase.is_initialized:
        try:
            ctx.firebase.update_status(status_object(state, stats))     # CONTRACT §8
            ctx.store.sink_ok("firebase")
        except FirebaseError as exc:
            if ctx.store.sink_failed("firebase", str(exc)):
                log.warning("Firebase unreachable: %s", exc)
    return stats
