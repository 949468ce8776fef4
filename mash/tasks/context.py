"""The worker's context: the store and the cloud clients its tasks share in one process.

One backend session and one MQTT connection per worker process. Built from settings by the
consumer's start-up hook (``python worker.py`` or a bare ``huey_consumer``), or handed in by
the guide's sync manager with the clients it was given.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque

from mash.sinks.backend_api import BackendAPIClient
from mash.sinks.firebase import FirebaseSync
from mash.sinks.mqtt_client import MQTTClient
from mash.clock import ClockSource, from_epoch, iso
from mash import health
from mash.config import Settings
from mash.control import effective_modes
from mash.models import Store
from mash.tasks.notify import Notifier, publish_routes
from mash.tasks.sync import IDENTITY

log = logging.getLogger("mash.worker")

_CREATE = object()      # "build this client from settings"


class WorkerContext:
    SWEEP_EVERY = 30.0
    IN_FLIGHT_FOR = 120.0    # an MQTT publish unconfirmed this long is sent again
    drain_batch = 500        # readings per request while a large backlog drains

    def __init__(self, settings: Settings, store: Store | None = None,
                 backend=_CREATE, mqtt=_CREATE, firebase=_CREATE,
                 clock_source: ClockSource | None = None):
        self.settings = settings
        self.started = time.time()            # the health figures' uptime
        self.store = store or Store(settings.db_path)
        if backend is _CREATE:
            backend = BackendAPIClient(settings) if settings.backend_enabled else None
        if mqtt is _CREATE:
            mqtt = MQTTClient(settings) if settings.mqtt_enabled else None
        if firebase is _CREATE:
            firebase = FirebaseSync(settings) if settings.firebase_enabled else None
        self.backend = backend if backend is not None and getattr(backend, "enabled", True) else None
        self.mqtt = mqtt if mqtt is not None and getattr(mqtt, "enabled", True) else None
        self.firebase = firebase if firebase is not None and firebase.is_initialized else None
        self.notifier = Notifier(settings.notify_sinks) if settings.notify_urls else None
        publish_routes(self.store, settings)
        self.registered = False
        # the deployed MASH backend's id for this device (CONTRACT §9), known from the last
        # registration so its MQTT topics are heard before the backend answers again
        self.backend_device: str | None = None
        self.backend_topic_callback = None       # fn(kind, topic, payload), set by the service
        if self.backend is not None and self.backend.profile.name == "mash":
            known = self.store.meta_get(IDENTITY) or {}
            if known.get("state") == "registered" and known.get("serial") == settings.device_id:
                self.backend_device = known.get("cuid")
        self.clock = clock_source or ClockSource(trust=settings.clock_sync == "trust")
        self._clock_fact_boot: str | None = None
        self.device_state = "ONLINE"          # what the backend last heard (status.heartbeat)
        # outbox item id -> when it was published to MQTT and not yet confirmed
        self.in_flight: dict[int, float] = {}
        self.confirmed: deque[int] = deque()      # PUBACKed outbox items not yet recorded
        self.intervals: dict[str, float] = {}
        self.reload_configuration()
        self.woken: set[str] = set()
        self.wakeup = threading.Event()
        self.deliver_again = threading.Event()

    def on_registered(self, device: str) -> None:
        """The deployed backend answered with its id for us: listen on its topics."""
        self.backend_device = device
        if self.mqtt is not None and self.backend_topic_callback is not None:
            self.mqtt.watch_backend_device(device, self.backend_topic_callback)

    def reload_configuration(self) -> None:
        """Intervals from settings, overridden by a CONFIGURE stored in the store."""
        s = self.settings
        configured = self.store.meta_get("configuration", {}) or {}
        self.intervals = {
            "sync": configured.get("sync_interval", s.sync_interval),
            "poll": configured.get("command_poll_interval", s.command_poll_interval),
            "heartbeat": configured.get("heartbeat_interval", s.heartbeat_interval),
            "deliver": self.SWEEP_EVERY,
            "config": s.config_pull_interval,
        }

    def wake(self, kind: str) -> None:
        """Ask the scheduler to run ``kind`` now: ``deliver`` (anything owed),
        ``deliver_now`` (only what should not wait for the sweep), ``sync``, ``heartbeat``."""
        self.woken.add(kind)
        self.wakeup.set()

    # -- MQTT publishes awaiting their PUBACK ---------------------------------------------
    # An item stays here after its PUBACK (as CONFIRMED) until a read of the outbox no longer
    # lists it: a sweep that read the outbox just before the confirmation was recorded must
    # not publish it again.
    CONFIRMED = float("inf")

    def claim_publish(self, item_id: int) -> bool:
        """True when ``item_id`` may be published now: not in flight, or in flight so long
        that the broker has surely lost it."""
        sent = self.in_flight.get(item_id)
        if sent is not None and (sent == self.CONFIRMED or
                                 time.monotonic() - sent < self.IN_FLIGHT_FOR):
            return False
        self.in_flight[item_id] = time.monotonic()
        return True

    def publish_confirmed(self, item_id: int) -> None:
        """The broker's PUBACK (paho's thread): remember it; the delivery sweep records it.
        No database write here: a write (an fsync) per PUBACK in paho's thread would stall the
        MQTT loop, and inbound commands would pile up at the broker."""
        self.in_flight[item_id] = self.CONFIRMED
        self.confirmed.append(item_id)
        self.wake("deliver_now")       # recorded now if it matters now, else at the sweep

    def take_confirmed(self) -> list[int]:
        taken = []
        while self.confirmed:
            taken.append(self.confirmed.popleft())
        return taken

    def publish_failed(self, item_id: int) -> None:
        self.in_flight.pop(item_id, None)

    def forget_settled(self, owed_ids: set[int]) -> None:
        """Drop confirmed items that a fresh read of the outbox no longer lists."""
        for item_id in [i for i, t in list(self.in_flight.items())
                        if t == self.CONFIRMED and i not in owed_ids]:
            self.in_flight.pop(item_id, None)

    # -- the clock ------------------------------------------------------------------------
    def backend_base(self) -> float | None:
        """True wall time minus ``CLOCK_BOOTTIME``, from the backend's last ``Date``."""
        server_clock = getattr(self.backend, "server_clock", None) if self.backend else None
        return server_clock[0] - server_clock[1] if server_clock else None

    def clock_offset(self) -> float | None:
        """Seconds to add to this machine's wall clock for true time: 0 once it is
        synchronized, the backend's offset (its ``Date``) until then, None when neither is
        known."""
        if self.clock.synchronized():
            return 0.0
        base = self.backend_base()
        return None if base is None else base + self.clock.boottime() - self.clock.wall()

    def note_backend_time(self) -> None:
        """After a backend answer: while our clock is not synchronized, record the backend's
        time for this boot in the store (``clock``), once, so the reader can rebase the
        readings it holds (mash.timekeeper)."""
        base = self.backend_base()
        boot = self.clock.boot_id()
        if base is None or self._clock_fact_boot == boot:
            return
        self._clock_fact_boot = boot
        if self.clock.synchronized():
            return
        offset = base + self.clock.boottime() - self.clock.wall()
        self.store.meta_set("clock", {"boot": boot, "base": base, "source": "backend",
                                      "offset_s": round(offset, 1),
                                      "at": iso(from_epoch(base + self.clock.boottime()))})
        log.warning("clock not synchronized: using the backend's time (ours is %+.0f s off) "
                    "until it is", -offset)

    def stats(self) -> dict:
        """The guide's stats, each room's control mode and the gateway's health figures."""
        configured = self.store.meta_get("configuration") or {}
        return {**self.store.get_stats(),
                "mode": effective_modes(self.settings.control_mode, configured.get("mode")),
                "health": health.snapshot(self.settings.data_dir, self.started,
                                          throttled_flags=health.throttled())}

    def publish_status(self) -> dict:
        stats = self.stats()
        if self.mqtt is not None and self.mqtt.is_alive():
            self.mqtt.publish_status("online", **stats)
        return stats

    def close(self) -> None:
        """A clean stop: MQTT's retained status says offline, the backend hears OFFLINE (one
        short try: a stop never waits on a dead uplink), and the heartbeat row says stopped."""
        if self.mqtt is not None:
            self.mqtt.disconnect()
            self.store.sink_failed("mqtt", "worker stopped")
        if self.backend is not None:
            if self.registered:
                try:
                    self.backend.update_status("OFFLINE", {"reason": "gateway stopped"},
                                               timeout=3.0)
                    log.info("backend told: OFFLINE")
                except Exception as exc:      # noqa: BLE001 - best effort on the way out
                    log.info("could not tell the backend OFFLINE: %s", exc)
            self.backend.close()
        try:
            self.store.beat("worker", self.intervals["heartbeat"], stopped=True)
        except Exception as exc:              # noqa: BLE001 - the store may be what failed
            log.debug("last heartbeat not written: %s", exc)
