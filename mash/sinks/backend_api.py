"""The backend's REST API: JWT auth, envelope, error classes, in two profiles.

``BACKEND_PROFILE`` picks which backend this is: ``guide``, the integration guide's API
(CONTRACT §2), or ``mash``, the deployed MASH backend (CONTRACT §9). One client; what differs
is data (``PROFILES``) and the few methods below that branch on it: the deployed backend
knows the device by its own id (a cuid, learnt at registration), takes readings per sensor,
wants ``X-API-Key`` on every non-GET request (its CSRF escape), nests ``/iot/devices``
answers one envelope deeper, and has no route for command outcomes or alerts.

Errors are classified in ``mash.sinks.errors``: ``RetryableError`` (network, timeout, 5xx,
429 with its Retry-After, and ``AuthError``: 401/403, the credentials or session refused) and
``PermanentError`` (any other 4xx, with the server's message: ``TooLarge``, ``BadRequest``,
``NotFound``, ``Conflict``). After a refused login the client backs off (``LOGIN_BACKOFF``, jittered):
no request goes to the backend until the next login attempt is due. The guide's methods
(``send_sensor_data``, ``send_alert``, ``get_actuator_commands``, ...) return plain values and
log failures; the lower-level ones raise.
"""
from __future__ import annotations

import itertools
import logging
import re
import threading
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import quote, urlsplit

import jwt
import requests
import urllib3

from mash.sinks.errors import (AuthError, BackendError, BadRequest, Conflict,  # noqa: F401
                               DeviceUnknown, NotAllowed, NotConfigured, NotFound, PermanentError,
                               RateLimited, RetryableError, TooLarge, backend_error)
from mash import __version__, health, ids
from mash.clock import BOOTTIME, from_epoch, iso, utcnow
from mash.config import Settings
from mash.contract import MASH_METRICS, ROOMS
from mash.pacing import BACKLOG, COMMANDS, LIVE, Pacer, equal_jitter

log = logging.getLogger("mash.backend")

CONNECT_TIMEOUT = 5.0

# A request the budget (mash.pacing) holds back this long or less waits in place; a longer
# wait gives the turn back as RateLimited, so a Huey retry picks the work up when it is due.
PACE_SLEEP_MAX = 3.0


@dataclass(frozen=True)
class Profile:
    """What one kind of backend wants (``PROFILES``)."""
    name: str
    api_key: bool               # X-API-Key on every non-GET request (the CSRF escape)
    per_url_rpm: int | None     # our ceiling per URL, under the backend's own limit
    acks: bool                  # a route for command outcomes
    alerts: bool                # a route for alerts
    config_pull: bool           # GET .../configuration carries a configuration


PROFILES = {
    "guide": Profile("guide", api_key=False, per_url_rpm=None, acks=True, alerts=True,
                     config_pull=True),
    # 20 requests a minute per farm IP and URL (CONTRACT §9): 18 leaves a margin for a clock
    # that does not quite agree with the backend's window
    "mash": Profile("mash", api_key=True, per_url_rpm=18, acks=False, alerts=False,
                    config_pull=False),
}
REGISTER_RETRY = 300.0      # s between registration attempts while the backend lacks us
DEVICE_TYPE = "MUSHROOM_CHAMBER"


def sensor_name(room: str, metric: str) -> str:
    """The name a sensor of ours is created with (CONTRACT §9 has no rooms): ``fruiting
    temperature``."""
    return f"{room} {metric}"


def match_sensors(sensors: list) -> dict[tuple[str, str], str]:
    """``{(room, metric): sensor id}`` from the device's sensor list: a sensor is ours for a
    room and metric when its ``type`` is the metric (any case) and its name holds the room
    as a word. The first listed wins when two match (the backend lists oldest first)."""
    found: dict[tuple[str, str], str] = {}
    for sensor in sensors if isinstance(sensors, list) else ():
        if not isinstance(sensor, dict) or not isinstance(sensor.get("id"), str):
            continue
        kind = str(sensor.get("type") or "").lower()
        words = set(re.split(r"[^a-z0-9]+", str(sensor.get("name") or "").lower()))
        for room in ROOMS:
            if kind in MASH_METRICS and room in words:
                found.setdefault((room, kind), sensor["id"])
    return found


def _inner(data):
    """The ``/iot/devices`` handlers' own ``{success,message,data}`` inside the envelope."""
    if isinstance(data, dict) and "success" in data and "data" in data:
        return data["data"]
    return data


def _listed(data, key: str, bare: bool = False) -> list:
    """``data[key]`` of a list answer (with ``bare``, a list as the answer itself), or
    RetryableError (an answer we cannot read)."""
    items = data.get(key) if isinstance(data, dict) else data if bare else None
    if not isinstance(items, list):
        raise RetryableError(f"{key} answer has no {key!r} list")
    return items


def unwrap(body):
    """The payload of a wrapped (``{"success":true,"data":...}``) or bare response."""
    if isinstance(body, dict) and "success" in body and "data" in body:
        return body["data"]
    return body


_TITLE_RE = re.compile(r"<title>(.*?)</title>", re.I | re.S)


def _error_message(resp: requests.Response) -> str:
    if "html" in resp.headers.get("Content-Type", ""):
        # the deployed backend's CSRF and body-size refusals are pages, not JSON
        m = _TITLE_RE.search(resp.text or "")
        return "an HTML error page" + (f" ({m.group(1).strip()[:100]})" if m else "")
    try:
        body = resp.json()
    except ValueError:
        return (resp.text or resp.reason or "")[:300]
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and (err.get("message") or err.get("type")):
            # production hides the message ("An unexpected error occurred"): the class says more
            kind = f"{err['type']}: " if err.get("type") else ""
            return f"{kind}{err.get('message') or ''}"[:300]
        if body.get("message"):
            return str(body["message"])[:300]
    return str(body)[:300]


def _never_left(exc: requests.RequestException) -> bool:
    """Did the request fail before it was sent? (a connect timeout, or "could not connect":
    refused, no route, no name; requests wraps urllib3's NewConnectionError for those)"""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(reason, urllib3.exceptions.NewConnectionError)


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
        self.profile = PROFILES[self.settings.backend_profile]
        self.cuid: str | None = None        # the deployed backend's id for this device
        self._columns_sent: dict = {}        # device columns the backend has from us
        self.last_latency_ms: float | None = None   # the last answered request's round trip
        self._lock = threading.RLock()
        self._access: str | None = None
        self._refresh: str | None = None
        self._access_exp = 0.0
        self._access_life = 0.0
        # the request budget: BACKEND_MAX_RPM in all, status and commands before the backlog;
        # a 429's Retry-After blocks it
        self.pacer = Pacer(rpm=self.settings.backend_max_rpm, per_url=self.profile.per_url_rpm)
        # A refused login (a rotated password, a locked account) blocks every request until
        # the next attempt is due: LOGIN_BACKOFF's first delay, doubled per refusal up to its
        # second, of which the later half is a random draw (``pacing.equal_jitter``), so a
        # fleet refused together by one backend fault does not log in again together. Reset
        # by a login or refresh that succeeds.
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
        delay = equal_jitter(self._auth_refusals, lo, hi)
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
        """Does the backend know this device? (a read of its configuration: 404 if not; under
        the deployed backend, its device by serial, checked to be ours)"""
        if self.profile.name == "mash":
            try:
                return self._device_by_serial() is not None
            except NotFound:
                return False
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
        if self.profile.api_key and method != "GET":
            hdrs["X-API-Key"] = self.settings.backend_api_key
        if auth:
            self._check_auth_block()
            hdrs["Authorization"] = f"Bearer {self._ensure_token()}"
        # Paced last, right before sending: getting a token may have waited on another
        # thread's refresh, during which a 429 may have arrived.
        self._pace(method, path, priority)
        sent_at = time.monotonic()
        try:
            resp = self.session.request(method, self.base + path, json=body, headers=hdrs,
                                        timeout=timeout or self.timeout)
        except requests.RequestException as exc:
            timeout_ = isinstance(exc, requests.Timeout)
            what = "timeout" if timeout_ else exc.__class__.__name__
            self._state(False, f"{what} on {method} {path}")
            error = RetryableError(f"timeout: {method} {path}" if timeout_ else
                                   f"network error: {what} on {method} {path}")
            # a request that never connected cannot have arrived; any other may have
            error.request = (method, path)
            error.maybe_delivered = not _never_left(exc)
            raise error from exc
        self.last_latency_ms = round(1000 * (time.monotonic() - sent_at), 1)
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
    def _device_path(self, suffix: str = "") -> str:
        """``/devices/<id><suffix>``: our serial (the guide), or the deployed backend's own id
        for the device, known once registered."""
        if self.profile.name == "guide":
            return f"/devices/{self.settings.device_id}{suffix}"
        if self.cuid is None:
            self.register_device()
        return f"/devices/{self.cuid}{suffix}"

    def register_device(self) -> dict:
        """Guide: POST /devices; a 409 means this serial is already ours. Deployed backend:
        POST /iot/devices (``_register_mash``)."""
        s = self.settings
        if self.profile.name == "mash":
            return self._register_mash()
        try:
            return self._send("POST", "/devices", {"name": s.device_name, "type": DEVICE_TYPE,
                                                   "serialNumber": s.device_id,
                                                   "firmware": "MASH Arduino v1.0"})
        except Conflict:
            return {"serialNumber": s.device_id, "alreadyRegistered": True}

    def _columns(self) -> dict:
        """The device columns we report: firmware (the gateway's version: the board reports
        none) and this machine's address on the way to the backend."""
        ip, mac = health.network_identity(urlsplit(self.base or "").hostname)
        return {k: v for k, v in (("firmware", f"MASH gateway {__version__}"),
                                  ("ipAddress", ip), ("macAddress", mac)) if v}

    def _ours(self, device, how: str) -> dict:
        """``device`` when it carries our serial; else DeviceUnknown (the backend's fall-back
        lookup hands back another farm's device for a serial it does not know)."""
        serial = self.settings.device_id
        if not isinstance(device, dict) or not isinstance(device.get("id"), str):
            raise RetryableError(f"{how}: the answer holds no device")
        if device.get("serialNumber") != serial:
            raise DeviceUnknown(
                f"the backend has no device {serial} ({how} answered with another device, "
                f"{str(device.get('serialNumber'))[:64]!r}): ask the MASH admin to create "
                f"device {serial}", None, REGISTER_RETRY)
        return device

    def _device_by_serial(self) -> dict | None:
        """GET /iot/devices/serial/<serial>: our device, or None when it is another's."""
        try:
            return self._ours(_inner(self._send(
                "GET", f"/iot/devices/serial/{quote(self.settings.device_id, safe='')}",
                auth=False)), "the lookup by serial")
        except DeviceUnknown:
            return None

    def _register_mash(self) -> dict:
        """POST /iot/devices with our serial, name, type and columns; the device's id from the
        answer, checked to be ours. Its 400 for a serial it does not know (whenever it holds
        any other device) is retried as a lookup by serial; a device that still is not ours
        raises DeviceUnknown: a person must create it (CONTRACT §9)."""
        s = self.settings
        columns = self._columns()
        body = {"name": s.device_name, "type": DEVICE_TYPE, "serialNumber": s.device_id,
                **columns, "status": "ONLINE"}
        try:
            device = self._ours(_inner(self._send("POST", "/iot/devices", body, auth=False)),
                                "registration")
        except BadRequest as exc:
            device = self._device_by_serial()
            if device is None:
                raise DeviceUnknown(
                    f"the backend has no device {s.device_id} (registration: {exc}): ask the "
                    f"MASH admin to create device {s.device_id}", 400, REGISTER_RETRY) from None
        if self.cuid != device["id"]:
            log.info("backend knows this gateway as device %s", device["id"])
        self.cuid = device["id"]
        self._columns_sent = dict(columns)
        return device

    def update_status(self, status: str = "ONLINE", metadata: dict | None = None,
                      timeout: float | None = None) -> dict:
        """The device's status: ONLINE, OFFLINE (a clean stop), MAINTENANCE or ERROR.
        Guide: PUT /devices/{id} with ``metadata``. Deployed backend: PATCH
        /iot/devices/serial/{serial} with the status and only the device columns that
        changed (it refuses any other key, so ``metadata`` stays here)."""
        if self.profile.name == "guide":
            return self._send("PUT", self._device_path(),
                              {"status": status, "lastSeen": iso(utcnow()),
                               "metadata": metadata or {}}, timeout=timeout)
        columns = self._columns()
        changed = {k: v for k, v in columns.items() if self._columns_sent.get(k) != v}
        answer = self._send("PATCH", f"/iot/devices/serial/{quote(self.settings.device_id, safe='')}",
                            {"status": status, **changed}, auth=False, timeout=timeout)
        self._columns_sent.update(changed)
        return _inner(answer)

    def post_health(self, figures: dict) -> dict:
        """POST /devices/:cuid/health (deployed backend): the health snapshot's figures under
        the backend's names (``mash.health.snapshot``; a figure not known is left out)."""
        body = {name: figures[key] for name, key in (
            ("cpuUsage", "cpu_pct"), ("memoryUsage", "memory_used_pct"),
            ("diskUsage", "disk_used_pct"), ("temperature", "cpu_temp_c"),
            ("networkLatency", "network_latency_ms"), ("uptime", "uptime_s"),
            ("errorCount", "error_count")) if figures.get(key) is not None}
        return self._send("POST", self._device_path("/health"), body)

    def list_sensors(self) -> list[dict]:
        """GET /devices/:cuid/sensors (deployed backend)."""
        return _listed(self._send("GET", self._device_path("/sensors"), priority=BACKLOG),
                       "sensors", bare=True)

    def create_sensor(self, room: str, metric: str) -> dict:
        """POST /devices/:cuid/sensors for one room's metric (a GROWER or ADMIN account)."""
        try:
            data = self._send("POST", self._device_path("/sensors"),
                              {"type": metric, "name": sensor_name(room, metric),
                               "unit": MASH_METRICS[metric]}, priority=BACKLOG)
        except AuthError as exc:
            if exc.status != 403:
                raise
            raise NotAllowed(f"creating sensor {sensor_name(room, metric)!r}: {exc}", 403) from None
        sensor = data.get("sensor", data) if isinstance(data, dict) else None
        if not isinstance(sensor, dict) or not isinstance(sensor.get("id"), str):
            raise RetryableError("sensor creation answer has no sensor id")
        return sensor

    def upload_sensor_batch(self, sensor_id: str, items: list[dict]) -> int:
        """POST /sensors/:id/data/batch ``{"data":[{"value","timestamp"}]}`` (deployed
        backend): how many it stored. It does not dedupe: the caller never sends a batch
        again once this returned."""
        data = self._send("POST", f"/sensors/{quote(sensor_id, safe='')}/data/batch",
                          {"data": items}, priority=BACKLOG)
        count = data.get("count") if isinstance(data, dict) else None
        if not isinstance(count, int):
            raise RetryableError("sensor batch answer has no 'count'")
        return count

    def upload_readings(self, readings: list[dict], key: str) -> dict:
        """POST /sensors/data with an Idempotency-Key; ``{"accepted", "duplicates"}``."""
        result = self._send("POST", "/sensors/data",
                            {"deviceId": self.settings.device_id, "readings": readings},
                            headers={"Idempotency-Key": key}, priority=BACKLOG)
        if not isinstance(result, dict) or not isinstance(result.get("accepted"), int):
            raise RetryableError("sensor upload answer has no 'accepted' count")
        return result

    def fetch_commands(self) -> list[dict]:
        return _listed(self._send("GET", self._device_path("/commands"), priority=COMMANDS),
                       "commands")

    def ack_command(self, command_id: str, status: str, response: dict | None = None,
                    acknowledged_at: str | None = None) -> dict:
        if not self.profile.acks:
            raise PermanentError("this backend has no route for command outcomes (CONTRACT §9)")
        return self._send("PUT", self._device_path(f"/commands/{command_id}"),
                          {"status": status, "response": response or {},
                           "acknowledgedAt": acknowledged_at or iso(utcnow())},
                          priority=COMMANDS)

    def trigger_alert(self, event_type: str, message: str, severity: str, room: str | None = None,
                      value: float | None = None, threshold: float | None = None,
                      triggered_at: str | None = None) -> dict:
        if not self.profile.alerts:
            raise PermanentError("this backend takes no alerts from a device (CONTRACT §9)")
        return self._send("POST", "/alerts/trigger", {
            "eventType": event_type, "severity": severity, "message": message,
            "deviceId": self.settings.device_id,
            "data": {k: v for k, v in (("room", room), ("value", value), ("threshold", threshold))
                     if v is not None},
            "triggeredAt": triggered_at or iso(utcnow())}, priority=COMMANDS)

    def get_configuration(self) -> dict:
        """The backend's configuration for this device ({} under the deployed backend: its
        route is a fixed placeholder; configuration arrives on MQTT)."""
        if not self.profile.config_pull:
            return {}
        data = self._send("GET", self._device_path("/configuration"))
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
        if self.profile.name == "mash":
            return self._send_line_mash(readings)
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

    def _send_line_mash(self, readings: list[dict]) -> bool:
        """One line to the deployed backend: a value per sensor the device has (the sweep,
        ``mash.tasks.sync``, also creates missing ones and keeps progress in the store)."""
        try:
            if self.cuid is None:
                self.register_device()
            sensors = match_sensors(self.list_sensors())
            sent = False
            for r in readings:
                for metric in MASH_METRICS:
                    sid = sensors.get((r["room"], metric))
                    if sid is not None and r.get(metric) is not None:
                        self.upload_sensor_batch(sid, [{"value": r[metric],
                                                        "timestamp": r["timestamp"]}])
                        sent = True
            return sent
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
