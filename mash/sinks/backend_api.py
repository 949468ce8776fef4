"""The MASH backend's REST API (CONTRACT.md section 2): JWT auth, envelope, error classes.

Errors are classified in ``mash.sinks.errors``: ``RetryableError`` (network, timeout, 5xx,
429 with its Retry-After, and ``AuthError``: 401/403, the credentials or session refused) and
``PermanentError`` (any other 4xx, with the server's message: ``TooLarge``, ``BadRequest``,
``NotFound``, ``Conflict``). After a refused login the client backs off (``LOGIN_BACKOFF``):
no request goes to the backend until the next login attempt is due. The guide's methods
(``send_sensor_data``, ``send_alert``, ``get_actuator_commands``, ...) return plain values and
log failures; the lower-level ones raise.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from email.utils import parsedate_to_datetime

import jwt
import requests

from mash.sinks.errors import (AuthError, BackendError, BadRequest, Conflict,  # noqa: F401
                               NotConfigured, NotFound, PermanentError, RateLimited,
                               RetryableError, TooLarge, backend_error)
from mash import ids
from mash.clock import BOOTTIME, from_epoch, iso, utcnow
from mash.config import Settings
from mash.contract import ROOMS
from mash.pacing import BACKLOG, COMMANDS, LIVE, Pacer

log = logging.getLogger("mash.backend")

CONNECT_TIMEOUT = 5.0
# A request the budget (mash.pacing) holds back this long or less waits in place; a longer
# wait gives the turn back as RateLimited, so a Huey retry picks the work up when it is due.
PACE_SLEEP_MAX = 3.0


def unwrap(body):
    """The payload of a wrapped (``{"success":true,"data":...}``) or bare response."""
    if isinstance(body, dict) and "success" in body and "data" in body:
        return body["data"]
    return body


def _error_message(resp: requests.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return (resp.text or resp.reason or "")[:300]
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:300]
        if body.get("message"):
            return str(body["message"])[:300]
    return str(body)[:300]


def _retry_after(resp: requests.Response) -> float:
    value = resp.headers.get("Retry-After", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return 60.0      # an HTTP-date or nothing: wait a minute rather than hammer


class BackendAPIClient:
    """One device's session with the backend. Thread-safe; tokens live in memory only."""

    LOGIN_BACKOFF = (30.0, 900.0)     # s: after the first refused login, at most

    def __init__(self, settings: Settings | None = None, session: requests.Session | None = None):
        self.settings = settings or Settings.load()
        self.base = self.settings.api_base
        self.session = session or requests.Session()
        self.session.headers["User-Agent"] = "mash-gateway/0.1"
        self.timeout = (CONNECT_TIMEOUT, self.settings.backend_timeout)
        self._lock = threading.RLock()
        self._access: str | None = None
        self._refresh: str | None = None
        self._access_exp = 0.0
        self._access_life = 0.0
        # the request budget: BACKEND_MAX_RPM in all, status and commands before the backlog;
        # a 429's Retry-After blocks it
        self.pacer = Pacer(rpm=self.settings.backend_max_rpm)
        # A refused login (a rotated password, a locked account) blocks every request until
        # the next attempt is due: LOGIN_BACKOFF's first delay, doubled per refusal up to its
        # second. Reset by a login or refresh that succeeds.
        self.login_backoff = self.LOGIN_BACKOFF
        self._auth_blocked_until = 0.0
        self._auth_refusals = 0
        # (the backend's time, CLOCK_BOOTTIME) at its last answer with a Date header
        self.server_clock: tuple[float, float] | None = None
        self._online: bool | None = None
        self._registered = False          # send_sensor_data registers once per client
        self._uid = ids.new_uid()             # reading ids of readings never stored
        self._seq = itertools.count(1)

    # -- state ---------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self.settings.backend_enabled

    @property
    def access_token(self) -> str | None:
        return self._access

    @property
    def blocked_for(self) -> float:
        return self.pacer.blocked_for()

    @property
    def auth_blocked_for(self) -> float:
        """Seconds until the next login attempt after a refused one (0: not blocked)."""
        return max(0.0, self._auth_blocked_until - time.monotonic())

    @property
    def auth_refused(self) -> bool:
        """The backend refused our last login (or our fresh session) and none has worked since."""
        return self._auth_refusals > 0

    def _state(self, online: bool, why: str = "") -> None:
        if online != self._online:
            if online:
                log.info("backend online (%s)", self.base)
            else:
                log.warning("backend offline: %s", why)
            self._online = online

    # -- auth ----------------------------------------------------------------------------
    def _take_tokens(self, data: dict) -> None:
        access, refresh = data.get("accessToken"), data.get("refreshToken")
        if not isinstance(access, str) or not access:
            raise PermanentError("auth response has no accessToken")
        try:
            claims = jwt.decode(access, options={"verify_signature": False})
            exp, iat = float(claims["exp"]), float(claims.get("iat", time.time()))
        except (jwt.InvalidTokenError, KeyError, TypeError, ValueError):
            raise PermanentError("access token is not a JWT with exp") from None
        self._access = access
        if isinstance(refresh, str) and refresh:
            self._refresh = refresh
        self._access_exp = exp
        self._access_life = max(1.0, exp - iat)
        if self._auth_refusals:
            log.info("backend accepts the device's credentials again")
        self._auth_refusals = 0
        self._auth_blocked_until = 0.0

    def _refused(self, exc: AuthError) -> AuthError:
        """The backend refused our credentials (after a fresh login) or our fresh session:
        block every request until the next login attempt is due, and say when that is."""
        lo, hi = self.login_backoff
        self._auth_refusals += 1
        delay = min(hi, lo * 2 ** (self._auth_refusals - 1))
        self._auth_blocked_until = time.monotonic() + delay
        self._access = self._refresh = None        # the next attempt starts with a login
        if self._auth_refusals == 1:
            log.error("backend refuses the device's credentials (%s): nothing is sent, everything "
                      "stays owed; logging in again in %.0f s, then less and less often", exc, delay)
        else:
            log.debug("login refused again; next attempt in %.0f s", delay)
        return AuthError(str(exc), exc.status, retry_after=delay)

    def _check_auth_block(self) -> None:
        wait = self.auth_blocked_for
        if wait > 0:
            raise AuthError("backend refused the device's credentials; waiting before the "
                            "next login attempt", 401, retry_after=wait)

    def _login(self, force: bool = False) -> None:
        """Log in; raises AuthError without sending while a refused login's backoff runs
        (``force``: try now anyway, for an explicit ``login()``/``authenticate()``)."""
        if not self.enabled:
            raise NotConfigured("backend not configured (BACKEND_URL, DEVICE_EMAIL, DEVICE_PASSWORD)")
        if not force:
            self._check_auth_block()
        try:
            data = self._send("POST", "/auth/login", {"email": self.settings.device_email,
                                                      "password": self.settings.device_password},
                              auth=False)
        except AuthError as exc:
            raise self._refused(exc) from None
        self._take_tokens(data)
        log.info("logged in to the backend as %s", self.settings.device_email)

    def _refresh_tokens(self) -> None:
        if not self._refresh:
            return self._login()
        try:
            data = self._send("POST", "/auth/refresh", {"refreshToken": self._refresh}, auth=False)
        except AuthError:
            log.info("refresh token refused; logging in again")
            self._refresh = None
            return self._login()
        self._take_tokens(data)
        log.debug("access token refreshed")

    def _ensure_token(self) -> str:
        with self._lock:
            if self._access is None:
                self._login()
            else:
                # Refresh when less than a quarter of the lifetime (at most 60 s) is left.
                margin = min(60.0, self._access_life / 4)
                if time.time() >= self._access_exp - margin:
                    self._refresh_tokens()
            return self._access

    def login(self) -> None:
        """Log in now; raises BackendError saying why (``mash doctor``)."""
        with self._lock:
            self._login(force=True)

    def device_registered(self) -> bool:
        """Does the backend know this device? (a read of its configuration: 404 if not)"""
        try:
            self._send("GET", f"/devices/{self.settings.device_id}/configuration")
            return True
        except NotFound:
            return False

    def authenticate(self) -> bool:
        """Log in now (the guide's call). False, with a log line, when it cannot."""
        try:
            with self._lock:
                self._login(force=True)
            return True
        except BackendError as exc:
            log.error("backend authentication failed: %s", exc)
            return False

    # -- transport -----------------------------------------------------------------------
    def _pace(self, method: str, path: str, priority: int) -> None:
        """Wait for the budget's slot for this request, or raise RateLimited with the wait."""
        while True:
            wait = self.pacer.acquire(path, priority)
            if wait <= 0:
                return
            blocked = self.pacer.blocked_for(path)
            if blocked > 0:
                raise RateLimited(f"rate limited by the backend for {blocked:.1f} more s", 429,
                                  blocked)
            if wait > PACE_SLEEP_MAX:
                raise RateLimited(f"{method} {path}: the request budget "
                                  f"(BACKEND_MAX_RPM={self.settings.backend_max_rpm}) is spent "
                                  f"for {wait:.1f} s", None, wait)
            time.sleep(wait)

    def _send(self, method: str, path: str, body=None, auth: bool = True, headers=None,
              _retried: bool = False, timeout: float | None = None, priority: int = LIVE):
        hdrs = dict(headers or {})
        if auth:
            self._check_auth_block()
            hdrs["Authorization"] = f"Bearer {self._ensure_token()}"
        # Paced last, right before sending: getting a token may have waited on another
        # thread's refresh, during which a 429 may have arrived.
        self._pace(method, path, priority)
        try:
            resp = self.session.request(method, self.base + path, json=body, headers=hdrs,
                                        timeout=timeout or self.timeout)
        except requests.Timeout as exc:
            self._state(False, f"timeout on {method} {path}")
            raise RetryableError(f"timeout: {method} {path}") from exc
        except requests.RequestException as exc:
            self._state(False, f"{exc.__class__.__name__} on {method} {path}")
            raise RetryableError(f"network error: {exc.__class__.__name__} on {method} {path}") from exc
        self._note_date(resp)
        status = resp.status_code
        if status < 400:
            self._state(True)
            if not resp.content:
                return {}
            try:
                return unwrap(resp.json())
            except ValueError:
                raise RetryableError(f"{method} {path}: answer is not JSON", status) from None
        message = _error_message(resp)
        error = backend_error(status, f"{method} {path}: {status} {message}")
        if status == 401 and auth:
            if not _retried:
                log.info("backend answered 401 to %s %s; renewing the session once", method, path)
                with self._lock:
                    self._refresh_tokens()
                return self._send(method, path, body, auth, headers, _retried=True,
                                  timeout=timeout, priority=priority)
            with self._lock:                 # a fresh session refused too: back off
                raise self._refused(error) from None
        if status == 429:
            after = _retry_after(resp)
            self.pacer.retry_after(path, after)
            log.warning("backend rate limit: no requests for %.0f s", after)
            raise RateLimited(str(error), status, after)
        if isinstance(error, RetryableError) and not isinstance(error, AuthError):
            self._state(False, f"{status} on {method} {path}")
        else:
            self._state(True)
        raise error

    def _note_date(self, resp) -> None:
        """The backend's clock from its ``Date`` header (one-second resolution, so half a
        second is added), paired with ``CLOCK_BOOTTIME`` at receipt: ``server_clock``. Not
        with our wall clock, which is what may be wrong."""
        try:
            server = parsedate_to_datetime(resp.headers["Date"]).timestamp() + 0.5
        except (KeyError, TypeError, ValueError, IndexError):
            return
        self.server_clock = (server, time.clock_gettime(BOOTTIME))

    # -- endpoints (raise) -------------------------------------------------------------------
    def register_device(self) -> dict:
        """POST /devices; a 409 means this serial is already ours."""
        s = self.settings
        try:
            return self._send("POST", "/devices", {"name": s.device_name, "type": "MUSHROOM_CHAMBER",
                                                   "serialNumber": s.device_id,
                                                   "firmware": "MASH Arduino v1.0"})
        except Conflict:
            return {"serialNumber": s.device_id, "alreadyRegistered": True}

    def update_status(self, status: str = "ONLINE", metadata: dict | None = None,
                      timeout: float | None = None) -> dict:
        """PUT /devices/{id}: ONLINE, OFFLINE (a clean stop), MAINTENANCE or ERROR."""
        return self._send("PUT", f"/devices/{self.settings.device_id}",
                          {"status": status, "lastSeen": iso(utcnow()), "metadata": metadata or {}},
                          timeout=timeout)

    def upload_readings(self, readings: list[dict], key: str) -> dict:
        """POST /sensors/data with an Idempotency-Key; ``{"accepted", "duplicates"}``."""
        result = self._send("POST", "/sensors/data",
                            {"deviceId": self.settings.device_id, "readings": readings},
                            headers={"Idempotency-Key": key}, priority=BACKLOG)
        if not isinstance(result, dict) or not isinstance(result.get("accepted"), int):
            raise RetryableError("sensor upload answer has no 'accepted' count")
        return result

    def fetch_commands(self) -> list[dict]:
        data = self._send("GET", f"/devices/{self.settings.device_id}/commands",
                          priority=COMMANDS)
        commands = data.get("commands") if isinstance(data, dict) else None
        if not isinstance(commands, list):
            raise RetryableError("commands answer has no 'commands' list")
        return commands

    def ack_command(self, command_id: str, status: str, response: dict | None = None,
                    acknowledged_at: str | None = None) -> dict:
        return self._send("PUT", f"/devices/{self.settings.device_id}/commands/{command_id}",
                          {"status": status, "response": response or {},
                           "acknowledgedAt": acknowledged_at or iso(utcnow())},
                          priority=COMMANDS)

    def trigger_alert(self, event_type: str, message: str, severity: str, room: str | None = None,
                      value: float | None = None, threshold: float | None = None,
                      triggered_at: str | None = None) -> dict:
        return self._send("POST", "/alerts/trigger", {
            "eventType": event_type, "severity": severity, "message": message,
            "deviceId": self.settings.device_id,
            "data": {k: v for k, v in (("room", room), ("value", value), ("threshold", threshold))
                     if v is not None},
            "triggeredAt": triggered_at or iso(utcnow())}, priority=COMMANDS)

    def get_configuration(self) -> dict:
        data = self._send("GET", f"/devices/{self.settings.device_id}/configuration")
        return (data or {}).get("configuration") or {}

    # -- the guide's API (plain values) --------------------------------------------------------
    def check_connection(self) -> bool:
        """Reachable and authenticated."""
        if not self.enabled:
            log.info("backend not configured")
            return False
        try:
            self._ensure_token()
            return True
        except BackendError as exc:
            log.warning("backend check failed: %s", exc)
            return False

    def send_sensor_data(self, data: dict) -> bool:
        """Upload one reading line (``{"fruiting": {...}, "timestamp": epoch}``).

        Reading ids follow the one scheme (``mash.ids``): the ids the store gave this
        reading (``data["reading_ids"]``, set by ``save_sensor_data``), so a reading stored
        and also sent here reaches the backend once; a reading never stored gets this
        client's own uid and a counter."""
        ts = data.get("timestamp")
        stamp = iso(from_epoch(ts) if isinstance(ts, (int, float)) else utcnow())
        known = data.get("reading_ids") if isinstance(data.get("reading_ids"), dict) else {}
        readings = []
        for room in ROOMS:
            v = data.get(room)
            if not isinstance(v, dict):
                continue
            rid = known.get(room) or ids.reading_id(self._uid, next(self._seq))
            readings.append({"id": rid, "room": room, "temperature": v.get("temp"),
                             "humidity": v.get("humidity"), "co2": v.get("co2"),
                             "timestamp": stamp})
        if not readings:
            return False
        try:
            if not self._registered:
                self.register_device()
                self._registered = True
            key = ids.batch_key([r["id"] for r in readings])
            self.upload_readings(readings, key=key)
            return True
        except BackendError as exc:
            log.warning("sensor upload failed: %s", exc)
            return False

    def send_alert(self, event_type: str, message: str, severity: str = "WARNING") -> bool:
        try:
            self.trigger_alert(event_type, message, severity)
            return True
        except BackendError as exc:
            log.warning("alert upload failed: %s", exc)
            return False

    def get_actuator_commands(self) -> list[dict]:
        """Commands still to act on (``pending``/``sent``); [] when the backend is away."""
        try:
            return [c for c in self.fetch_commands() if isinstance(c, dict)
                    and c.get("status") in ("pending", "sent")]
        except BackendError as exc:
            log.warning("command fetch failed: %s", exc)
            return []

    def close(self) -> None:
        self.session.close()
        self._access = self._refresh = None


def create_backend_client(settings: Settings | None = None) -> BackendAPIClient:
    return BackendAPIClient(settings)
