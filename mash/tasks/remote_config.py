"""Configuration pulled from the cloud: the backend's ``GET /devices/{id}/configuration`` and,
when Firebase is on, ``/devices/{id}/config``, at start and every ``CONFIG_PULL_INTERVAL``
(600 s).

The rule (a newer CONFIGURE wins): a pulled configuration is applied, merged exactly like a
``CONFIGURE`` command, only when it has *changed at its source* since the last pull. So a
``CONFIGURE`` sent after the backend's configuration last changed stays in force, and the
next change made in the backend (or Firebase) overrides it in turn: whichever was changed
last is what the gateway runs with. Settings the gateway does not know are ignored (named in
one log line); a configuration whose known settings are invalid is refused as a whole, once
per version of it, and so is one that cannot run with the limits in force (the same check
as a ``CONFIGURE``'s).
"""
from __future__ import annotations

import hashlib
import json
import logging

from mash.commands import CONFIGURABLE, Rejected, configure
from mash.sinks.firebase import FirebaseError
from mash.tasks.sync import backend_call, ensure_registered

log = logging.getLogger("mash.worker")


def pull_configuration(ctx) -> dict:
    """Read every configured source and apply what changed there; returns
    ``{source: "applied" | "unchanged" | "empty" | "refused: why"}``."""
    outcome = {}
    if ctx.backend is not None and ctx.backend.profile.config_pull:
        ensure_registered(ctx)
        outcome["backend"] = apply_pulled(ctx, "backend",
                                          backend_call(ctx, ctx.backend.get_configuration))
    if ctx.firebase is not None:
        try:
            config = ctx.firebase.get_config()
        except FirebaseError as exc:
            log.debug("Firebase configuration not read: %s", exc)
            outcome["firebase"] = f"unreachable: {exc}"
        else:
            outcome["firebase"] = apply_pulled(ctx, "firebase", config)
    return outcome


def apply_pulled(ctx, source: str, config) -> str:
    if not isinstance(config, dict) or not config:
        return "empty"
    digest = hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
    store = ctx.store
    seen = store.meta_get("pulled_configuration") or {}
    if seen.get(source) == digest:
        return "unchanged"
    known = {k: v for k, v in config.items() if k in CONFIGURABLE}
    ignored = sorted(set(config) - set(known))
    if ignored:
        log.info("configuration from %s: ignoring settings the gateway does not have: %s",
                 source, ", ".join(map(str, ignored))[:200])
    with store.transaction():         # checked against the limits in force, as a CONFIGURE is
        try:
            merged = configure(ctx.settings, store.meta_get("configuration"), known)
        except Rejected as exc:
            refused = exc
        else:
            refused = None
            if known:
                store.meta_set("configuration", merged)
        store.meta_set("pulled_configuration", {**seen, source: digest})
        if refused is not None:
            store.incr("config_pull.refused")
    if refused is not None:
        log.error("configuration from %s refused: %s", source, refused)
        return f"refused: {refused}"
    ctx.reload_configuration()
    if known:
        log.info("configuration from %s applied: %s", source, ", ".join(sorted(known)))
    return "applied"
