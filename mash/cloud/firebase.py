"""Optional backup to Firebase Realtime Database (CONTRACT.md section 4).

firebase-admin is imported only when ``FIREBASE_DATABASE_URL`` is set, so a gateway without
Firebase never loads it. Keys are fixed when a reading is stored (``fb_key``), so a batch sent
twice overwrites itself; a batch is one multi-path ``update``: one HTTP request.
``FIREBASE_DATABASE_EMULATOR_HOST`` is honoured as firebase-admin does.
"""
from __future__ import annotations

import datetime as dt
import itertools
import logging
import os

from mash import ids
from mash.clock import from_epoch
from mash.cloud.errors import SinkError, kind_for_status
from mash.config import Settings

log = logging.getLogger("mash.firebase")


_APP_SEQ = itertools.count(1)


class FirebaseError(SinkError):
    """Writing to Firebase failed; worth retrying later (``kind`` from the HTTP status, when
    there was one: ``mash.cloud.errors``). Never the readings' fault: they stay owed."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message, status)
        self.kind = kind_for_status(status)


def reading_key(timestamp, previous: str | None = None) -> str:
    """The reading's key (``mash.ids.firebase_key``) from a datetime or epoch seconds."""
    if isinstance(timestamp, (int, float)):
        timestamp = from_epoch(timestamp)
    return ids.firebase_key(timestamp, previous)


class FirebaseSync:
    def __init__(self, settings: Settings | None = None):
        self.settings = s = settings or Settings.load()
        self.is_initialized = False
        self._app = None
        self._db = None
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
            self._app = firebase_admin.initialize_app(cred, {"databaseURL": s.firebase_database_url},
                                                      name=name)
            self._db = db
            self.is_initialized = True
            log.info("Firebase backup on (%s)", s.firebase_database_url)
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

    def write_readings(self, readings: list[dict]) -> int:
        """One multi-path update for the whole batch; raises FirebaseError."""
        if not self.is_initialized:
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
