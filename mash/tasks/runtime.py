"""The worker process's long-lived parts: the cloud clients, the schedule and the live feed.

Huey runs the tasks; this object holds what they share in one process (the one MQTT
connection, the backend session) and two small threads:

- the scheduler, which runs the periodic jobs in-process on their own intervals (seconds, not
  Huey's minute crontab) and enqueues a Huey task only when there is work for it — every
  enqueue costs SD-card writes in the queue file;
- the live feed, which publishes each new reading to MQTT within ~50 ms of the reader
  committing it, by watching SQLite's ``data_version`` (no write, no queue).
"""
from __future__ import annotations

import datetime as dt
import logging
import queue
import threading
import time
from itertools import groupby

from mash.config import Settings
from mash.models import DatabaseManager

log = logging.getLogger("mash.worker")

_CREATE = object()      # "build this client from settings"


class Runtime:
    LIVE_POLL = 0.05
    SWEEP_EVERY = 30.0
    drain_batch = 500        # readings per request while a large backlog drains (jobs.sync_readings)

    def __init__(self, settings: Settings, store: DatabaseManager | None = None,
                 backend=_CREATE, mqtt=_CREATE, firebase=_CREATE, live_feed: bool = True):
        self.settings = settings
        self.store = store or DatabaseManager(settings.db_path)
        if backend is _CREATE:
            from mash.cloud.backend_api import BackendAPIClient
            backend = BackendAPIClient(settings) if settings.backend_enabled else None
        if mqtt is _CREATE:
            from mash.cloud.mqtt_client import MQTTClient
            mqtt = MQTTClient(settings) if settings.mqtt_enabled else None
        if firebase is _CREATE:
            from mash.cloud.firebase import FirebaseSync
            firebase = FirebaseSync(settings) if settings.firebase_enabled else None
        self.backend = backend if backend is not None and getattr(backend, "enabled", True) else None
        self.mqtt = mqtt if mqtt is not None and getattr(mqtt, "enabled", True) else None
        self.firebase = firebase if firebase is not None and firebase.is_initialized else None
        self.live_feed = live_feed and self.mqtt is not None
        self.registered = False
        self.in_flight: set = set()
        self.intervals = {}
        self.reload_configuration()
        self._wake = threading.Event()
        self._woken: set[str] = set()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.started = False
        self._lifecycle = threading.Lock()
        self.live_published = 0
        self.connect_hooks: list = []     # called (in paho's thread) on every MQTT connect
        self._commands: queue.Queue = queue.Queue(maxsize=10000)

    # -- configuration ----------------------------------------------------------------------
    def reload_configuration(self) -> None:
        """Intervals from settings, overridden by a CONFIGURE command stored in the store."""
        s = self.settings
        configured = self.store.meta_get("configuration", {}) or {}
        self.intervals = {
            "sync": configured.get("sync_interval", s.sync_interval),
            "poll": configured.get("command_poll_interval", s.command_poll_interval),
            "heartbeat": configured.get("heartbeat_interval", s.heartbeat_interval),
            "sweep": self.SWEEP_EVERY,
        }

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        with self._lifecycle:
            if self.started:
                return
            self.started = True
        if self.mqtt is not None:
            # paho's thread only queues; the intake thread does the parsing and the writes,
            # so a burst of commands never stalls the MQTT loop (PUBACKs, keepalives).
            self.mqtt.set_command_callback(self._queue_command, raw=True)
            self._spawn("command-intake", self._intake)
            self.mqtt.status_extra = self.store.get_stats
            self.mqtt.on_state_change = self._mqtt_state
            self.mqtt.connect(timeout=0)
        self._spawn("scheduler", self._schedule)
        if self.live_feed:
            self._spawn("live-feed", self._live)
        log.info("worker started: backend %s, MQTT %s, Firebase %s",
                 "on" if self.backend else "off", "on" if self.mqtt else "off",
                 "on" if self.firebase else "off")

    def _spawn(self, name, target):
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        with self._lifecycle:
            if not self.started:
                return
            self.started = False
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout=15)
        if self.mqtt is not None:
            self.mqtt.disconnect()
            self.store.sink_failed("mqtt", "worker stopped")
        log.info("worker stopped")

    def _queue_command(self, raw: bytes) -> None:
        try:
            self._commands.put_nowait(raw)
        except queue.Full:
            self.store.incr("bad_command.overload")
            log.warning("command intake full (%d waiting): dropping a command payload",
                        self._commands.qsize())

    def _intake(self) -> None:
        from mash.commands import intake, parse_payload
        while not self._stop.is_set():
            try:
                raw = self._commands.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                cmd, size = parse_payload(raw, self.store)
                if cmd is not None:
                    intake(self, cmd, "mqtt", size)
            except Exception:
                log.exception("command intake failed")

    def wake(self, kind: str) -> None:
        """Ask the scheduler to run ``kind`` (acks | alerts | sync) now."""
        self._woken.add(kind)
        self._wake.set()

    def _mqtt_state(self, connected: bool) -> None:
        if connected:
            self.store.sink_ok("mqtt")
            for hook in self.connect_hooks:
                hook()
            self.in_flight.clear()      # a new session: whatever was unconfirmed is sent again
            self.wake("acks")
            self.wake("alerts")
        else:
            self.store.sink_failed("mqtt", "disconnected")

    def publish_status(self) -> dict:
        stats = self.store.get_stats()
        if self.mqtt is not None and self.mqtt.is_alive():
            self.mqtt.publish_status("online", **stats)
        return stats

    # -- the schedule ---------------------------------------------------------------------------
    def _schedule(self) -> None:
        from mash import tasks
        next_run = {name: 0.0 for name in self.intervals}
        next_run["heartbeat"] = time.monotonic() + 2.0
        while not self._stop.is_set():
            now = time.monotonic()
            woken, self._woken = self._woken, set()
            try:
                if now >= next_run["sync"] or "sync" in woken:
                    next_run["sync"] = now + self.intervals["sync"]
                    tasks.enqueue_sync(self)
                if now >= next_run["poll"]:
                    next_run["poll"] = now + self.intervals["poll"]
                    self._quietly("command poll", tasks.poll_commands)
                if now >= next_run["sweep"] or woken & {"acks", "alerts"}:
                    next_run["sweep"] = now + self.intervals["sweep"]
                    if self.store.has_undelivered():     # a read; the task's lock is a write
                        self._quietly("ack delivery", tasks.deliver_acks)
                        self._quietly("alert delivery", tasks.deliver_alerts)
                if now >= next_run["heartbeat"]:
                    next_run["heartbeat"] = now + self.intervals["heartbeat"]
                    self._quietly("heartbeat", tasks.heartbeat)
            except Exception:
                log.exception("scheduler step failed")
            wait = max(0.0, min(next_run.values()) - time.monotonic())
            self._wake.wait(min(wait, 1.0))
            self._wake.clear()

    def _quietly(self, what: str, task) -> None:
        """Run a task's body here, not through the queue (no queue write), under the same
        lock as a queued run; its own next run is the retry."""
        from huey.exceptions import RetryTask, TaskLockedException
        from mash.cloud.errors import BackendError
        try:
            task.call_local()
        except TaskLockedException:
            log.debug("%s already running", what)
        except (BackendError, RetryTask) as exc:
            log.debug("%s deferred: %s", what, exc)
        except Exception:
            log.exception("%s failed", what)

    # -- the live feed ----------------------------------------------------------------------------
    def _live(self) -> None:
        """Publish readings as they are stored. Readings taken while the broker was away are
        not replayed here (they reach the backend and Firebase with their timestamps)."""
        store, mqtt = self.store, self.mqtt
        last_id, version, was_alive = store.last_reading_id(), None, False
        while not self._stop.is_set():
            try:
                alive = mqtt.is_alive()
                if alive and not was_alive:
                    last_id = store.last_reading_id()
                was_alive = alive
                if alive:
                    v = store.data_version()
                    if v != version:
                        version = v
                        rows = store.readings_after(last_id, 500)
                        if rows:
                            last_id = rows[-1].id
                            self._publish_lines(rows)
            except Exception:
                log.exception("live feed step failed")
                self._stop.wait(1.0)
            self._stop.wait(self.LIVE_POLL)

    def _publish_lines(self, rows) -> None:
        for ts, line in groupby(rows, key=lambda r: r.timestamp):
            line = list(line)
            data = {r.room: {"temp": r.temperature, "humidity": r.humidity, "co2": r.co2} for r in line}
            data["timestamp"] = ts.replace(tzinfo=dt.timezone.utc).timestamp()
            self.mqtt.publish_sensor_data(data, reading_id=self.store.reading_id(line[0].id))
            self.live_published += 1
