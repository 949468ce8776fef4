"""Status out: the heartbeat to every sink (backend device status, retained MQTT status,
Firebase)."""
from __future__ import annotations

import logging
import time

from mash.cloud.errors import PermanentError, RetryableError
from mash.cloud.firebase import FirebaseError
from mash.tasks.sync import backend_call, ensure_registered

log = logging.getLogger("mash.worker")


def heartbeat(ctx) -> dict:
    """Status to every sink; a sink that fails is recorded, never raised (its next beat is
    the retry)."""
    stats = ctx.stats()
    if ctx.backend is not None:
        try:
            ensure_registered(ctx)
            backend_call(ctx, ctx.backend.update_status, "ONLINE", stats)
        except (RetryableError, PermanentError) as exc:
            log.debug("status to backend failed: %s", exc)
    if ctx.mqtt is not None and ctx.mqtt.is_alive():
        ctx.mqtt.publish_status("online", **stats)
        ctx.store.sink_ok("mqtt")
    if ctx.firebase is not None and ctx.firebase.is_initialized:
        try:
            ctx.firebase.update_status({"status": "online", "timestamp": time.time(), **stats})
            ctx.store.sink_ok("firebase")
        except FirebaseError as exc:
            if ctx.store.sink_failed("firebase", str(exc)):
                log.warning("Firebase unreachable: %s", exc)
    return stats
