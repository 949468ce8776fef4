"""The reader's periodic chores, every few seconds whether or not the board talks: stale
sensor alerts, the disk budget (retention and its alarm), CONFIGURE'd thresholds, and the
summary line a minute."""
from __future__ import annotations

import logging
import time

from mash.alerts import AlertEngine, AlertEvent
from mash.config import Settings
from mash.control import ClimateController
from mash.commands import limits_in_force
from mash.models.retention import OWED_STALE
from mash.rules import ConfigError

log = logging.getLogger("mash.reader")


class Housekeeping:
    EVERY = 5.0
    SUMMARY_EVERY = 60.0
    BUDGET_EVERY = 60.0
    AGE_OUT_EVERY = 3600.0      # one batch an hour: fewer pages rewritten than a trickle

    def __init__(self, settings: Settings, store, engine: AlertEngine,
                 controller: ClimateController | None = None, add_alerts=None):
        self.settings, self.store, self.engine = settings, store, engine
        self.add_alerts = add_alerts or store.add_alerts    # the reader's write-or-hold path
        self.controller = controller
        self._configured = None
        self._storage_over = (store.meta_get("storage") or {}).get("over")
        self._last = 0.0
        self._last_budget = 0.0
        self._last_age_out: float | None = None
        self._drops_logged: set[str] = set()
        self._last_summary = time.monotonic()
        self._summary_base = (0, 0)
        self.reload_configuration()

    def due(self, now: float) -> bool:
        if now - self._last < self.EVERY:
            return False
        self._last = now
        return True

    def run(self, now: float, stored_rows: int, bad_total: int) -> None:
        if now - self._last_budget >= self.BUDGET_EVERY:
            self._last_budget = now
            self.check_budget()
        events = self.engine.check_stale()
        if events:
            self.add_alerts(events)
            for e in events:
                log.warning("alert %s: %s", e.state, e.message)
        self.reload_configuration()
        if now - self._last_summary >= self.SUMMARY_EVERY:
            stored, bad0 = self._summary_base
            log.info("last %.0f s: %d readings stored, %d bad lines; %d pending sync",
                     now - self._last_summary, stored_rows - stored, bad_total - bad0,
                     self.store.pending_count())
            self._summary_base = (stored_rows, bad_total)
            self._last_summary = now

    def check_budget(self, now=None) -> None:
        """MAX_DB_MB: the hourly age-out (at once when over the budget), then retention; if
        what is left is all unsynced, say so loudly. ``now``: the wall time to age out
        against (default the clock's)."""
        max_bytes = self.settings.max_db_mb * 2**20
        mono = time.monotonic()
        if (self._last_age_out is None or mono - self._last_age_out >= self.AGE_OUT_EVERY
                or self.store.used_bytes() > max_bytes):
            self._last_age_out = mono
            aged = self.store.age_out(now)
            if any(aged.values()):
                log.debug("retention: aged out %d outbox rows, %d commands, %d alerts",
                          aged["outbox"], aged["commands"], aged["alerts"])
        state = self.store.enforce_budget(max_bytes, firebase_on=self.settings.firebase_enabled,
                                          now=now)
        for sink, n in state["dropped"].items():
            if sink not in self._drops_logged:
                self._drops_logged.add(sink)
                log.warning("retention: the store needed room: dropped %d items owed to %s for "
                            "over %d days (counted in outbox_dropped.%s; later drops are "
                            "counted, not logged)", n, sink, OWED_STALE.days, sink)
        if state["deleted"]:
            log.info("retention: deleted %d synced readings (store %.1f MB of %.0f MB)",
                     state["deleted"], state["used_mb"], state["max_mb"])
        if state["over"] == self._storage_over:
            return
        if state["over"]:
            message = (f"store {state['used_mb']:.0f} MB is over MAX_DB_MB={state['max_mb']:.0f} "
                       "with data not yet synced: nothing unsynced is deleted, recording goes on")
            log.error("%s", message)
            self.add_alerts([AlertEvent("storage_full", "CRITICAL", None, state["used_mb"],
                                              state["max_mb"], "raised", message)])
        elif self._storage_over:
            log.info("store back under MAX_DB_MB (%.1f MB)", state["used_mb"])
            self.add_alerts([AlertEvent("storage_full", "CRITICAL", None, state["used_mb"],
                                              state["max_mb"], "cleared",
                                              "store back under its budget")])
        self._storage_over = state["over"]

    def reload_configuration(self) -> None:
        """Thresholds, control rules and room modes set by CONFIGURE (stored by the worker)
        apply within a few seconds."""
        configured = self.store.meta_get("configuration")
        if configured == self._configured:
            return
        self._configured = configured
        configured = configured or {}
        try:     # the same function a CONFIGURE is checked with before it is stored
            thresholds, rules = limits_in_force(self.settings, configured)
        except ConfigError as exc:        # stored before that check, or ALERT_THRESHOLDS changed
            log.error("ignoring the configured limits and rules: %s", exc)
            thresholds, rules = None, None
        if thresholds is not None:
            self.engine.thresholds = thresholds
            if configured.get("thresholds"):
                log.info("alert thresholds updated by CONFIGURE")
        if self.controller is None:
            return
        try:
            if rules is not None:
                self.controller.rules = rules
                if configured.get("control"):
                    log.info("climate control rules updated by CONFIGURE")
            if configured.get("mode"):
                self.controller.set_room_modes(configured["mode"])
                log.info("room modes: %s", ", ".join(f"{room} {m}" for room, m in
                                                     self.controller.status()["mode"].items()))
        except ConfigError as exc:
            log.error("ignoring configured climate control: %s", exc)
