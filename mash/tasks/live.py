"""The live MQTT feed: each new reading published within ~50 ms of the reader's commit, and
the retained ``actuator_states`` whenever a relay or a room's mode changes; and the MASH
apps' live values in Firebase (``FirebaseLiveFeed``).

It watches SQLite's ``data_version`` (no write, no queue) when the store's wake-up hints say
another process committed (``HintRelay``), and every ``FALLBACK`` s in case one was lost. Readings taken while the broker
was away are not replayed here: they reach the backend and Firebase with their timestamps,
which is where history belongs; a day of readings on a "now" topic would set off dashboards
on stale values and flood a metered uplink just as it comes back. A simulated board's
readings are not published either, unless SIM_SYNC=1 (``Store.readings_after``).
"""
from __future__ import annotations

import logging
from itertools import groupby

from mash.clock import iso, to_epoch
from mash.sinks.firebase import FirebaseError, live_updates
from mash.contract import ROOMS
from mash.control import effective_modes
from mash.tasks.loop import BackgroundLoop

log = logging.getLogger("mash.worker")


class LiveFeed(BackgroundLoop):
    POLL = 0.05         # s between looks without wake-up hints
    FALLBACK = 5.0      # s between looks with them (a hint may be lost, never a reading)
    BATCH = 500
    thread_name = "live-feed"

    def __init__(self, ctx):
        super().__init__()
        self.ctx = ctx
        self.published = 0
        self._actuators = None          # the last actuator_states published

    def run_loop(self) -> None:
        store, mqtt = self.ctx.store, self.ctx.mqtt
        last_id, version, was_alive = store.last_reading_id(), None, False
        while not self._stop.is_set():
            try:
                alive = mqtt.is_alive()
                if alive and not was_alive:
                    last_id = store.last_reading_id()
                    self._actuators = None        # a new session: say it again (retained)
                was_alive = alive
                if alive:
                    v = store.data_version()
                    if v != version or self._actuators is None:
                        version = v
                        last_id = self._step(last_id)
                        self._publish_actuators()
            except Exception:
                log.exception("live feed step failed")
                self._stop.wait(1.0)
            self.pause(self.POLL, self.FALLBACK)

    def _step(self, last_id: int) -> int:
        """Publish the readings past ``last_id``; returns the new ``last_id``.

        Local-only readings (a simulated board's) are never published, and are stepped
        over rather than scanned again at every poll: when fewer than a batch came back
        and nothing is held for the clock, every row up to ``upto`` has been seen."""
        store = self.ctx.store
        upto = store.last_reading_id()
        # read after upto: a hold set after it is on a row past upto, which is not skipped
        held = store.clock_hold() is not None
        rows = store.readings_after(last_id, self.BATCH, upto=upto)
        if rows:
            self._publish(rows)
            last_id = rows[-1].id
        if len(rows) < self.BATCH and not held:
            last_id = max(last_id, upto)
        return last_id

    def _publish_actuators(self) -> None:
        """The retained ``actuator_states`` whenever a relay or a room's mode changed."""
        configured = self.ctx.store.meta_get("configuration") or {}
        snapshot = (self.ctx.store.actuator_states(),
                    effective_modes(self.ctx.settings.control_mode, configured.get("mode")))
        if snapshot != self._actuators and self.ctx.mqtt.publish_actuator_states(*snapshot):
            self._actuators = snapshot

    def _publish(self, rows) -> None:
        for ts, line in groupby(rows, key=lambda r: r.timestamp):
            line = list(line)
            data = {r.room: {"temp": r.temperature, "humidity": r.humidity, "co2": r.co2}
                    for r in line}
            data["timestamp"] = to_epoch(ts)
            self.ctx.mqtt.publish_sensor_data(data, reading_id=self.ctx.store.reading_id(line[0].id))
            device = self.ctx.backend_device
            if device is not None:      # the deployed backend relays it to the apps' socket
                self.ctx.mqtt.publish_to(f"devices/{device}/data", {
                    "serialNumber": self.ctx.settings.device_id, "timestamp": iso(ts),
                    **{r.room: {"temperature": r.temperature, "humidity": r.humidity,
                                "co2": r.co2} for r in line}}, qos=0)
            self.published += 1


class FirebaseLiveFeed(BackgroundLoop):
    """The MASH apps' live values (CONTRACT §8): ``devices/{serial}/latest_reading`` and
    ``live_readings/{serial}/{room}`` from the newest stored line, one multi-path update per
    line, within a poll (0.25 s) of the reader's commit.

    Only the newest line is ever written, and never one older than the last written: after
    an outage the apps see the present at once, not a replay, and a drain never writes an
    older reading over a newer one (history goes to ``historical_aggregates``)."""
    POLL = 0.25
    FALLBACK = 5.0
    RETRY = 2.0
    thread_name = "firebase-live"

    def __init__(self, ctx):
        super().__init__()
        self.ctx = ctx
        self.written = 0
        self.last_ts = None             # the newest line written

    def newest_line(self):
        """The newest stored line's rows (the store's own query: no held or filtered ones)."""
        store = self.ctx.store
        rows = store.readings_after(max(0, store.last_reading_id() - 4 * len(ROOMS)), 4 * len(ROOMS))
        if not rows:
            return None, []
        ts = rows[-1].timestamp
        return ts, [r for r in rows if r.timestamp == ts]

    def step(self) -> bool:
        """Write the newest line if it is newer than the last written; True when it wrote."""
        ts, line = self.newest_line()
        if ts is None or (self.last_ts is not None and ts <= self.last_ts):
            return False
        values = {r.room: {"temperature": r.temperature, "humidity": r.humidity, "co2": r.co2}
                  for r in line}
        self.ctx.firebase.update(live_updates(self.ctx.settings.device_id, values, to_epoch(ts)))
        self.last_ts = ts
        self.written += 1
        return True

    def run_loop(self) -> None:
        store = self.ctx.store
        version, failing = None, False
        while not self._stop.is_set():
            try:
                v = store.data_version()
                if v != version or failing:
                    version = v
                    self.step()
                    if failing:
                        failing = False
                        if store.sink_ok("firebase"):
                            log.info("Firebase reachable")
            except FirebaseError as exc:
                if not failing and store.sink_failed("firebase", str(exc)):
                    log.warning("Firebase unreachable: %s", exc)
                failing = True
                self._stop.wait(self.RETRY)
            except Exception:
                log.exception("Firebase live feed step failed")
                self._stop.wait(1.0)
            self.pause(self.POLL, self.RETRY if failing else self.FALLBACK)
