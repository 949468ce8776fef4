"""The guide's sync manager: its API over the same runtime and Huey tasks as the worker.

For an application that reads sensors itself (the guide's "Integration with Main
Application"): ``start()`` runs an in-process Huey consumer and the runtime's scheduler, so the
same tasks drain the store, deliver alerts and acks, and bring commands in. Commands that need
the hardware (``set_actuator``) wait in the ledger for ``get_pending_command()`` and are closed
by ``acknowledge_command()``. Where the gateway's own reader runs, use the worker instead.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque

from mash.alerts import AlertEvent
from mash.models import Command, DatabaseManager

log = logging.getLogger("mash.sync")

SEVERITIES = ("INFO", "WARNING", "CRITICAL")


class SyncManager:
    def __init__(self, db_manager: DatabaseManager, backend_client=None, mqtt_client=None,
                 firebase_sync=None, settings=None):
        from mash import tasks
        from mash.tasks.runtime import Runtime
        self.settings = settings or tasks.settings
        self.store = db_manager
        self.runtime = Runtime(self.settings, store=db_manager, backend=backend_client,
                               mqtt=mqtt_client, firebase=firebase_sync, live_feed=False)
        self._consumer = None
        # Readings queued while the broker is away, published on connect; bounded, oldest
        # dropped first (the store holds every reading for the backend anyway).
        self._live: deque = deque(maxlen=1000)
        self._live_lock = threading.Lock()
        self.runtime.connect_hooks.append(self._flush_live)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Run the tasks in this process: a Huey consumer (threads) and the scheduler."""
        from mash import tasks
        from mash.worker import CONSUMER_OPTIONS
        tasks.set_runtime(self.runtime)
        if tasks.settings.queue_path != self.settings.queue_path:
            tasks.use_queue_file(self.settings.queue_path)
        self.runtime.start()
        if not tasks.huey.immediate:
            options = dict(CONSUMER_OPTIONS, flush_locks=True)
            self._consumer = tasks.huey.create_consumer(**options)
            # start() would install signal handlers: the application owns those.
            self._consumer.scheduler.start()
            for _, worker in self._consumer.worker_threads:
                worker.start()

    def stop(self) -> None:
        if self._consumer is not None:
            self._consumer.stop(graceful=True)
            self._consumer = None
        self.runtime.stop()
        from mash import tasks
        tasks.set_runtime(None)

    # -- the guide's calls --------------------------------------------------------------------
    def queue_sensor_data(self, data: dict) -> bool:
        """Queue a reading for the live MQTT feed; sent now when connected, else on connect
        (at most the latest 1,000; the store is the durable copy)."""
        if self.runtime.mqtt is None:
            return False
        self._live.append(dict(data, timestamp=data.get("timestamp", time.time())))
        self._flush_live()
        return True

    def _flush_live(self) -> None:
        mqtt = self.runtime.mqtt
        with self._live_lock:
            while self._live and mqtt.is_alive():
                if not mqtt.publish_sensor_data(self._live[0]):
                    break
                self._live.popleft()

    def queue_alert(self, alert_type: str, message: str, severity: str = "WARNING",
                    room: str | None = None) -> None:
        """Store an alert durably and have it delivered to the backend and MQTT."""
        if severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {', '.join(SEVERITIES)}")
        self.store.add_alerts([AlertEvent(alert_type, severity, room, None, None, "raised", message)])
        self._enqueue("deliver_alerts")

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
        cmd = Command.get_or_none(Command.command_id == command_id)
        desired = None
        if cmd is not None and success and cmd.command == "set_actuator":
            params = json.loads(cmd.parameters)
            desired = (params["actuator"], params["state"])
        changed = self.store.finish_command(command_id, bool(success), response=response,
                                            reason=None if success else "failed on the device",
                                            desired=desired)
        if changed:
            self._enqueue("deliver_acks")
        return changed

    def get_stats(self) -> dict:
        stats = self.store.get_stats()
        if self.runtime.mqtt is not None:
            stats["mqtt_online"] = self.runtime.mqtt.is_alive()
        return stats

    def force_sync(self) -> None:
        self._enqueue("force_sync")

    def _enqueue(self, name: str) -> None:
        from mash import tasks
        getattr(tasks, name)()


def create_sync_manager(db_manager: DatabaseManager, backend_client=None, mqtt_client=None,
                        firebase_sync=None, settings=None) -> SyncManager:
    return SyncManager(db_manager, backend_client, mqtt_client, firebase_sync, settings)
