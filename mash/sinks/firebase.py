"""Optional backup to Firebase Realtime Database: the guide's layout (CONTRACT §4) and the
MASH apps' (§8), chosen by ``FIREBASE_LAYOUT`` (apps | guide | both), through one client.

The apps' layout is data (``APPS_PATHS``) plus pure functions that turn our facts into its
objects; the tasks decide when to write them. firebase-admin is imported only when ``FIREBASE_DATABASE_URL`` is set, so a gateway without
Firebase never loads it. Keys are fixed when a reading is stored (``fb_key``), so a batch sent
twice overwrites itself; a batch is one multi-path ``update``: one HTTP request.
``FIREBASE_DATABASE_EMULATOR_HOST`` is honoured as firebase-admin does.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import logging
import os
import socket
import threading

import time

from mash import __version__, ids
from mash.clock import from_epoch, iso, utcnow
from mash.sinks.errors import SinkError, kind_for_status
from mash.config import MASH_SERIAL_RE, Settings
from mash.contract import ACTUATORS, APPS_ACTUATORS
from mash.pacing import Reconnects

log = logging.getLogger("mash.firebase")


_APP_SEQ = itertools.count(1)


class FirebaseError(SinkError):
    """Writing to Firebase failed; worth retrying later (``kind`` from the HTTP status, when
    there was one: ``mash.sinks.errors``). Never the readings' fault: they stay owed."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message, status)
        self.kind = kind_for_status(status)


# -- the MASH apps' layout (CONTRACT §8) -------------------------------------------------------
APPS_PATHS = {
    "status": "devices/{serial}/status",                  # every layout
    "latest_reading": "devices/{serial}/latest_reading",
    "live": "live_readings/{serial}/{room}",
    "aggregate": "historical_aggregates/{serial}/{room}/{month}/{day}/{hour}",
    "latest_actuators": "devices/{serial}/latest_actuators",
    "actuator_log": "actuator_logs/{serial}/{key}",
    "alert": "alerts/{serial}/{key}",
    "notification": "notifications/{serial}/{key}",
    "command_queue": "devices/{serial}/command_queue",
}
GUIDE_PATHS = {"reading": "sensor_data/{room}/{key}", "config": "devices/{serial}/config"}
APPS_NAMES = {actuator: key for key, actuator in APPS_ACTUATORS.items()}
assert set(APPS_NAMES) == set(ACTUATORS)


def apps_path(what: str, serial: str, **parts) -> str:
    return APPS_PATHS[what].format(serial=serial, **parts)


def serial_warning(device_id: str) -> str | None:
    """Why ``device_id`` is not a MASH serial (the apps list devices by serial), or None."""
    if MASH_SERIAL_RE.match(device_id):
        return None
    return (f"DEVICE_ID {device_id!r} is not a MASH serial (MASH-{{A|B|R}}<n>-<LOC><YY>-<6 hex>, "
            "e.g. MASH-B2-CAL26-CE637C): the MASH apps find a device by its serial")


def time_key(ts: dt.datetime) -> str:
    """An ISO time as a key: ``:`` and ``.`` replaced by ``-`` (CONTRACT §8)."""
    return iso(ts).replace(":", "-").replace(".", "-")


def live_updates(serial: str, line: dict, ts: float) -> dict:
    """``latest_reading`` and each room's ``live_readings`` for one reading line
    (``{room: {"temperature", "humidity", "co2"}}``, ``ts`` Unix seconds): one update."""
    latest = apps_path("latest_reading", serial)
    updates = {f"{latest}/timestamp": ts}
    for room, v in line.items():       # per room: a room missing from a line keeps its last
        updates[f"{latest}/{room}"] = {"temperature": v["temperature"], "humidity": v["humidity"],
                                       "co2": v["co2"], "timestamp": ts}
        updates[apps_path("live", serial, room=room)] = {
            "current_temp": v["temperature"], "current_hum": v["humidity"],
            "current_co2": v["co2"], "last_updated": ts}
    return updates


def aggregate_path(serial: str, room: str, hour: dt.datetime) -> str:
    return apps_path("aggregate", serial, room=room, month=hour.strftime("%Y-%m"),
                     day=hour.strftime("%d"), hour=hour.strftime("%H:00"))


def actuators_object(states: dict, at: dt.datetime) -> dict:
    """``latest_actuators`` from ``{ACTUATOR: "ON"|"OFF"}`` (an actuator never set is off)."""
    obj: dict = {"timestamp": iso(at)}
    for actuator, (room, name) in APPS_NAMES.items():
        obj.setdefault(room, {})[name] = states.get(actuator) == "ON"
    return obj


def actuator_log(actuator: str, state: str, source: str, at: dt.datetime) -> dict:
    room, name = APPS_NAMES[actuator]
    return {"room": room, "actuator": name, "state": state,
            "mode": "auto" if source == "auto" else "manual", "timestamp": iso(at),
            "timestamp_unix": int(at.replace(tzinfo=dt.timezone.utc).timestamp())}


def status_object(state: str, stats: dict) -> dict:
    """§8's status (every layout): ``ONLINE``/``OFFLINE``/``ERROR``, ``last_update`` and the
    metadata the dashboard shows (from the guide's stats)."""
    board = (((stats.get("processes") or {}).get("reader") or {}).get("board") or {})
    firmware = board.get("firmware")
    try:
        last_boot = iso(from_epoch(time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)))
    except (AttributeError, OSError):      # not Linux
        last_boot = None
    meta = {"last_boot": last_boot, "firmware_version": firmware,
            "gateway_version": __version__, "control_mode": stats.get("mode"),
            "health": stats.get("health")}
    meta.update({k: stats[k] for k in ("pending_records", "total_synced", "last_reading",
                                       "backend_online", "mqtt_online") if k in stats})
    return {"status": state, "last_update": iso(utcnow()),
            "metadata": {k: v for k, v in meta.items() if v is not None}}


class QueueItemRejected(ValueError):
    """A ``command_queue`` item that is no command of ours."""


def command_from_queue(push_key: str, item) -> dict:
    """The ledger's command for one ``command_queue`` item (§8): ``set_actuator`` for a
    relay, ``CONFIGURE`` of every room's mode for ``set_auto_mode``. Raises
    QueueItemRejected for anything else."""
    cmd_id = f"fb-{push_key}"
    if not isinstance(item, dict):
        raise QueueItemRejected(f"not an object: {str(item)[:60]!r}")
    if item.get("command_type") == "set_auto_mode":
        if not isinstance(item.get("enabled"), bool):
            raise QueueItemRejected("set_auto_mode without a boolean 'enabled'")
        mode = "auto" if item["enabled"] else "manual"
        return {"id": cmd_id, "command": "CONFIGURE",
                "parameters": {"mode": {"fruiting": mode, "spawning": mode}}}
    room, name, state = item.get("room"), item.get("actuator"), item.get("state")
    actuator = APPS_ACTUATORS.get((str(room).lower(), str(name).lower()))
    if actuator is None:
        raise QueueItemRejected(f"unknown actuator {str(name)[:40]!r} in room {str(room)[:20]!r}")
    if isinstance(state, bool):
        word = "ON" if state else "OFF"
    elif isinstance(state, str) and state.upper() in ("ON", "OFF"):
        word = state.upper()
    else:
        raise QueueItemRejected(f"state {str(state)[:20]!r} is neither a boolean nor ON/OFF")
    return {"id": cmd_id, "command": "set_actuator",
            "parameters": {"actuator": actuator, "state": word}}


def reading_key(timestamp, previous: str | None = None) -> str:
    """The reading's key (``mash.ids.firebase_key``) from a datetime or epoch seconds."""
    if isinstance(timestamp, (int, float)):
        timestamp = from_epoch(timestamp)
    return ids.firebase_key(timestamp, previous)


class QueueStream:
    """A wake-up for the apps' command queue: the Realtime Database's event stream on it.

    ``on_items()`` runs on the stream's own thread whenever the queue holds items (at each
    connect: what was queued while we were away; at each item added), and when the stream is
    lost, so the caller's long wait ends and it polls. A deletion (ours) does not call it. It
    carries no data: the intake reads the queue itself, so a lost or repeated event costs a
    look, never a command. ``connected`` says whether the caller may wait long. A dropped
    connection is opened again after a full-jitter wait (1 s doubling to a minute, reset only
    by a connection held a minute: ``pacing.Reconnects``), a read silent for ``READ_TIMEOUT``
    (the database sends a keep-alive every 30 s) counts as dropped, and an answer that is not
    an event stream (a captive portal's page) as a failure. The hourly ``auth_revoked`` (the
    token expired) reconnects at once and quietly.

    firebase-admin's own ``Reference.listen`` runs a thread no close can wake from a blocked
    read (a stop would wait for the next keep-alive) and ends it at the first refused
    reconnect; this uses its session and URL on a daemon thread that retries."""

    READ_TIMEOUT = 75.0

    def __init__(self, url: str, params: dict, session, on_items):
        self.url, self.params, self.session, self.on_items = url, params, session, on_items
        self.connected = False
        self.reconnects = Reconnects(first=1.0, cap=60.0, held=60.0)
        self._closed = threading.Event()
        self._response = None
        self._said: bool | None = None    # the state last logged: one line per change
        self._thread = threading.Thread(target=self._run, name="firebase-stream", daemon=True)

    def start(self) -> "QueueStream":
        self._thread.start()
        return self

    def close(self) -> None:
        """Never blocks: closing the response here would wait on the lock its blocked read
        holds (until the next keep-alive). Shutting its socket down ends that read at once;
        where the socket cannot be reached the daemon thread ends at the next event."""
        self._closed.set()
        sock = getattr(getattr(getattr(self._response, "raw", None), "_connection", None),
                       "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                if self._listen():
                    continue                       # the token expired: again at once
                reason = "closed by the database"
            except Exception as exc:   # requests' errors, a refusal (HTTPError), a bad event
                reason = f"{exc.__class__.__name__}: {exc}"
            if self._closed.is_set():
                break
            was = self.connected
            self.connected = False
            if was:
                self.on_items()                    # the caller's long wait ends: it polls
            if self._said is not False:
                log.info("Firebase command stream %s (%s): polling the queue until it is back",
                         "lost" if self._said else "not open", reason)
                self._said = False
            self._closed.wait(self.reconnects.next_delay())
        self.connected = False

    def _listen(self) -> bool:
        """One connection, until it ends; True when the database asked for a new one."""
        response = self.session.get(self.url, params=self.params, stream=True,
                                    headers={"Accept": "text/event-stream",
                                             "Cache-Control": "no-cache"},
                                    timeout=(10.0, self.READ_TIMEOUT))
        self._response = response
        with response:
            if self._closed.is_set():
                return False
            response.raise_for_status()
            kind = response.headers.get("Content-Type", "")
            if not kind.startswith("text/event-stream"):
                raise ValueError(f"not an event stream ({kind or 'no Content-Type'})")
            self.connected, event, pending = True, None, b""
            self.reconnects.connected()
            if self._said is False:
                log.info("Firebase command stream back")
            self._said = True
            # what has arrived, as it arrives: a stream delimited by its connection's end is
            # not chunked, and a fixed-size read would wait for bytes not sent yet
            while not self._closed.is_set():
                chunk = response.raw.read1(8192)
                if not chunk:
                    return False
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for raw in lines:
                    line = raw.decode("utf-8", "replace").rstrip("\r")
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif not line.startswith("data:"):
                        continue
                    elif event in ("put", "patch"):
                        payload = json.loads(line[5:])
                        if isinstance(payload, dict) and payload.get("data") is not None:
                            self.on_items()
                    elif event == "auth_revoked":
                        return True
                    elif event == "cancel":        # the rules refuse us: a failure
                        raise PermissionError(f"stream cancelled: {line[5:].strip()}")
        return False


class FirebaseSync:
    def __init__(self, settings: Settings | None = None):
        self.settings = s = settings or Settings.load()
        self.is_initialized = False
        self._app = None
        self._db = None
        self.layout = s.firebase_layout
        self.apps = self.layout in ("apps", "both")      # CONTRACT §8
        self.guide = self.layout in ("guide", "both")    # CONTRACT §4
        self.serial = s.device_id
        if not s.firebase_enabled:
            log.debug("Firebase not configured")
            return
        try:
            import firebase_admin
            from firebase_admin import credentials, db
        except ImportError:
            log.error("FIREBASE_DATABASE_URL is set but firebase-admin is not installed "
                      "(pip install 'mash-gateway[firebase]'); Firebase backup is off")
            return
        try:
            if os.path.isfile(s.firebase_credentials):
                cred = credentials.Certificate(s.firebase_credentials)
            elif os.environ.get("FIREBASE_DATABASE_EMULATOR_HOST"):
                cred = credentials.ApplicationDefault()   # never consulted by the emulator path
            else:
                raise ValueError(f"no service-account key at {s.firebase_credentials}")
            name = f"mash-{s.device_id}-{next(_APP_SEQ)}"     # one firebase app per instance
            self._app = firebase_admin.initialize_app(cred, {"databaseURL": s.firebase_database_url,
                                                             "httpTimeout": 15},
                                                      name=name)
            self._db = db
            self.is_initialized = True
            log.info("Firebase backup on (%s, layout %s)", s.firebase_database_url, self.layout)
            if self.apps and serial_warning(s.device_id):
                log.warning("%s", serial_warning(s.device_id))
        except (ValueError, OSError) as exc:
            log.error("Firebase initialization failed: %s; Firebase backup is off", exc)

    def _ref(self, path: str):
        return self._db.reference(path, app=self._app)

    def _call(self, what: str, fn):
        try:
            return fn()
        except Exception as exc:    # firebase-admin raises its own, requests' and ValueError
            status = getattr(getattr(exc, "http_response", None), "status_code", None)
            raise FirebaseError(f"Firebase {what} failed: {exc.__class__.__name__}: {exc}",
                                status) from exc

    def update(self, updates: dict) -> None:
        """One multi-path update (``None`` deletes that path); raises FirebaseError."""
        if self.is_initialized and updates:
            self._call("update", lambda: self._ref("/").update(updates))

    def queue_items(self) -> dict:
        """The apps' ``command_queue``: ``{pushKey: item}`` (raises FirebaseError)."""
        if not self.is_initialized:
            return {}
        value = self._call("command_queue read", lambda: self._ref(
            apps_path("command_queue", self.serial)).get())
        return value if isinstance(value, dict) else {}

    def stream_queue(self, on_items) -> "QueueStream | None":
        """The apps' ``command_queue`` as a stream (``QueueStream``), or None when Firebase is
        off or this firebase-admin cannot give the stream its session."""
        if not self.is_initialized:
            return None
        try:
            ref = self._ref(apps_path("command_queue", self.serial))
            client = ref._client       # the URL and the authorised session firebase-admin uses
            url, params = client.base_url + ref.path + ".json", dict(client.params)
            session = client.create_listener_session()
        except Exception as exc:       # another firebase-admin: the queue is polled as before
            log.info("no command-queue stream with this firebase-admin (%s): polling it", exc)
            return None
        return QueueStream(url, params, session, on_items).start()

    def delete_queue_item(self, push_key: str) -> None:
        self._call("command_queue delete", lambda: self._ref(
            f"{apps_path('command_queue', self.serial)}/{push_key}").delete())

    def write_readings(self, readings: list[dict]) -> int:
        """The guide's ``sensor_data``: one multi-path update for the whole batch; raises
        FirebaseError. Nothing (0) when the layout is ``apps``."""
        if not self.is_initialized or not self.guide:
            return 0
        updates, last = {}, {}
        for r in readings:
            key = r.get("key") or reading_key(r.get("timestamp") or dt.datetime.now(dt.timezone.utc),
                                              last.get(r["room"]))
            last[r["room"]] = key
            updates[f"sensor_data/{r['room']}/{key}"] = {
                "temperature": r.get("temperature", r.get("temp")),
                "humidity": r.get("humidity"), "co2": r.get("co2")}
        if updates:
            self._call("update", lambda: self._ref("/").update(updates))
        return len(updates)

    def sync_sensor_readings(self, readings: list[dict]) -> int:
        """The guide's call: how many readings were written (0 on failure, logged)."""
        try:
            return self.write_readings(readings)
        except FirebaseError as exc:
            log.warning("%s", exc)
            return 0

    def update_status(self, status: dict) -> None:
        if self.is_initialized:
            self._call("status", lambda: self._ref(f"devices/{self.settings.device_id}/status")
                       .set(status))

    def get_config(self) -> dict:
        if not self.is_initialized:
            return {}
        value = self._call("config read", lambda: self._ref(
            f"devices/{self.settings.device_id}/config").get())
        return value if isinstance(value, dict) else {}

    def close(self) -> None:
        if self._app is not None:
            import firebase_admin
            firebase_admin.delete_app(self._app)
            self._app, self.is_initialized = None, False


def create_firebase_sync(settings: Settings | None = None) -> FirebaseSync:
    return FirebaseSync(settings)
