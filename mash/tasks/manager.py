"""The guide's sync manager: its API over the worker's own context, tasks and service.

For an application that reads sensors itself (the guide's "Integration with Main
Application"): ``start()`` runs an in-process Huey consumer and the worker's service, so the
same tasks drain the store, deliver alerts and acks, and bring commands in. Commands that
need the hardware (``set_actuator``) wait in the ledger for ``get_pending_command()`` and
are closed by ``acknowledge_command()``. Where the gateway's own reader runs, use the worker
instead. It leaves the host application's logging and signal handlers alone.
"""
from __future__ import annotations

import json
import threading
import time
from collections import deque

from mash import tasks
from mash.alerts import AlertEvent
from mash.config import Settings
from mash.contract import SEVERITIES
from mash.models import Store
from mash.tasks.context import WorkerContext
from mash.tasks.queue import CONSUMER_OPTIONS


class SyncManager:
    def __init__(self, db_manager: Store, backend_client=None, mqtt_client=None,
                 firebase_sync=None, settings: Settings | None = None):
        self.settings = settings or Settings.load()      # ConfigError on a bad value
        self.store = db_manager
        self.context = WorkerContext(self.settings, store=db_manager, backend=backend_client,
                                     mqtt=mqtt_client, firebase=firebase_sync)
        self._service = None
        self._consumer = None
        self._queue_before = None
        # Readings queued while the broker is away, published on connect; bounded, oldest
        # dropped first (the store holds every reading for the backend anyway).
        self._live: deque = deque(maxlen=1000)
        self._live_lock = threading.Lock()

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Run the tasks in this process: a Huey consumer (threads) and the worker service."""
        tasks.set_context(self.context)
        self._queue_before = tasks.huey.storage_kwargs.get("filename")
        if str(self._queue_before) != str(self.settings.queue_path):
            tasks.use_queue_file(self.settings.queue_path)
        self._service = tasks.start_service(self.context, live_feed=False)
        self._service.connect_hooks.append(self._flush_live)
        if not tasks.huey.immediate:
            self._consumer = tasks.huey.create_consumer(**CONSUMER_OPTIONS)
            # Consumer.start() would install signal handlers: the application owns those.
            self._consumer.scheduler.start()
            for _, worker in self._consumer.worker_threads:
                worker.start()

    def stop(self) -> None:
        if self._consumer is not None:
            self._consumer.stop(graceful=True)
            self._consumer = None
        if self._service is not None:
            self._service.stop()
            self._service = None
        tasks.set_context(None)
        if self._queue_before and str(self._queue_before) != str(self.settings.queue_path):
            tasks.use_queue_file(self._queue_before)     # the process's own queue again

    # -- the guide's calls --------------------------------------------------------------------
    def queue_sensor_data(self, data: dict) -> bool:
        """Queue a reading for the live MQTT feed; sent now when connected, else on connect
        (at most the latest 1,000; the store is the durable copy)."""
        if self.context.mqtt is None:
            return False
        self._live.append(dict(data, timestamp=data.get("timestamp", time.time())))
        self._flush_live()
        return True

    def _flush_live(self) -> None:
        mqtt = self.context.mqtt
        with self._live_lock:
            while self._live and mqtt.is_alive():
                data = self._live[0]
                first = next(iter((data.get("reading_ids") or {}).values()), None)
                if not mqtt.publish_sensor_data(data, reading_id=first):
                    break
                self._live.popleft()

    def queue_alert(self, alert_type: str, message: str, severity: str = "WARNING",
                    room: str | None = None) -> None:
        """Store an alert durably and have it delivered to the backend and MQTT."""
        if severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {', '.join(SEVERITIES)}")
        self.store.add_alerts([AlertEvent(alert_type, severity, room, None, None, "raised",
                                          message)])
        tasks.deliver()

    def get_pending_command(self, timeout: float = 0.0) -> dict | None:
        """The next ``set_actuator`` command to execute, or None after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            cmd = self.store.claim_command()
            if cmd is not None:
                return {"id": cmd.command_id, "command": cmd.command,
                        "parameters": json.loads(cmd.parameters), "source": cmd.source}
            if time.monotonic() >= deadline:
                return None
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def acknowledge_command(self, command_id: str, success: bool, response: dict | None = None) -> bool:
        """Close a command; its final status goes to the backend and MQTT ``command_ack``."""
        cmd = self.store.command(command_id)
        desired = None
        if cmd is not None and success and cmd.command == "set_actuator":
            params = json.loads(cmd.parameters)
            desired = (params["actuator"], params["state"])
        changed = self.store.finish_command(command_id, bool(success), response=response,
                                            reason=None if success else "failed on the device",
                                            desired=desired)
        if changed:
            tasks.deliver()
        return changed

    def get_stats(self) -> dict:
        stats = self.store.get_stats()
        if self.context.mqtt is not None:
            stats["mqtt_online"] = self.context.mqtt.is_alive()
        return stats

    def force_sync(self) -> None:
        tasks.force_sync()


def create_sync_manager(db_manager: Store, backend_client=None, mqtt_client=None,
                        firebase_sync=None, settings: Settings | None = None) -> SyncManager:
    return SyncManager(db_manager, backend_client, mqtt_client, firebase_sync, settings)
