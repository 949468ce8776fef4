"""Status out: the heartbeat to every sink (backend device status, retained MQTT status,
Firebase)."""
from __future__ import annotations

import datetime as dt
import logging

from mash.alerts import AlertEvent
from mash.clock import iso, parse_iso, utcnow
from mash.sinks.errors import PermanentError, RetryableError
from mash.sinks.firebase import FirebaseError, status_object
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


DEVICE_ALERT = "board_lost"          # the board (or the reader) gone for five minutes


def _device_alert(ctx, state: str, why: str | None) -> None:
    """The device's ERROR as a CRITICAL ``board_lost`` alert, raised once and cleared once
    (read back from the store, so a restarted worker does not raise it again): it reaches
    every sink, and the grower's phone, as any alert does."""
    active = (None, DEVICE_ALERT) in ctx.store.active_alert_keys()
    if state == "ERROR" and not active:
        ctx.store.add_alerts([AlertEvent(DEVICE_ALERT, "CRITICAL", None, None, None, "raised",
                                         why)])
        ctx.wake("deliver_now")
    elif state != "ERROR" and active:
        ctx.store.add_alerts([AlertEvent(DEVICE_ALERT, "CRITICAL", None, None, None, "cleared",
                                         "board connected again")])
        ctx.wake("deliver_now")


def health_figures(ctx, stats: dict) -> dict:
    """The health snapshot (``stats["health"]``) with what the deployed backend's health
    record also has: the last round trip to it (``network_latency_ms``) and ``error_count``,
    the conditions wrong right now (active alerts)."""
    latency = getattr(ctx.backend, "last_latency_ms", None)
    return {**stats.get("health", {}), "network_latency_ms": latency,
            "error_count": len(ctx.store.active_alert_keys())}


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
    _device_alert(ctx, state, why)
    if ctx.backend is not None:
        try:
            ensure_registered(ctx)
            backend_call(ctx, ctx.backend.update_status, state,
                         {**stats, **({"error": why} if why else {})})
            if ctx.backend.profile.name == "mash":
                backend_call(ctx, ctx.backend.post_health, health_figures(ctx, stats))
        except (RetryableError, PermanentError) as exc:
            log.debug("status to backend failed: %s", exc)
    if ctx.mqtt is not None and ctx.mqtt.is_alive():
        ctx.mqtt.publish_status("online", **stats)
        if ctx.backend_device is not None:      # the deployed backend relays it to the apps
            ctx.mqtt.publish_to(f"devices/{ctx.backend_device}/status",
                                {"status": state, "serialNumber": ctx.settings.device_id,
                                 "timestamp": iso(utcnow()), **stats.get("health", {})})
        ctx.store.sink_ok("mqtt")
    if ctx.firebase is not None and ctx.firebase.is_initialized:
        try:
            ctx.firebase.update_status(status_object(state, stats))     # CONTRACT §8
            ctx.store.sink_ok("firebase")
        except FirebaseError as exc:
            if ctx.store.sink_failed("firebase", str(exc)):
                log.warning("Firebase unreachable: %s", exc)
    return stats
