"""The deployed MASH backend (CONTRACT §9) as a replica: ``mash devserver --profile mash``.

Its endpoints, tables and rules as plain methods (the HTTP shell is ``http.MashHandler``).
Faithful, not convenient: it answers as the NestJS backend does, bugs included, so a gateway
proven against it works against the real one. Where §9 is silent the behaviour was read from
the backend's source (``MASH-Mushroom-Automation/MASH-Backend``):

Order of a request (Express middleware, then Nest's guards, pipes, handler, filters):
  correlation id -> CSRF -> JSON body parser (100 kB) -> route (404 if none) -> the global
  throttler -> the route's JWT guard -> its roles guard -> validation -> handler.
  So a CSRF refusal, a 413, a malformed body and an unknown route never count against the
  rate limit; everything routed does, 401s and 400s included.
- CSRF (``csrf-protection.middleware.ts``): GET/HEAD/OPTIONS pass (and get a token: cookies
  ``_csrf_secret`` + ``XSRF-TOKEN`` and header ``X-CSRF-Token``); paths that *start with* an
  exempt prefix pass (``/api/v1/auth/login``, ``/api/v1/iot/devices``, ... , see
  ``CSRF_EXEMPT``); any non-empty ``X-API-Key`` passes; else a token (``x-csrf-token`` or
  ``x-xsrf-token``, HMAC of the secret cookie, 24 h) or 403. The middleware is mounted with
  ``app.use`` outside Nest, so its refusal is Express's HTML error page (production: the
  status text), as is a body-parser refusal (413 above 100 kB, 400 for malformed JSON).
- Errors: the catch-all filter is registered last, so it answers every exception:
  ``{success:false,statusCode,timestamp,path,method,[correlationId],error:{type,code:
  "INTERNAL_SERVER_ERROR",message:"An unexpected error occurred"}}``; ``correlationId`` only
  when the client sent ``X-Correlation-Id``. The real message goes to the replica's log.
- Rate limit (``throttler.guard.ts``, ``redis-throttler.storage.ts``): the global guard runs
  before the route's JWT guard, so every caller is a GUEST: 20 per 60 s keyed by client IP and
  ``req.url`` (path and query string). A fixed window from the first hit (Redis INCR+EXPIRE):
  every routed request increments it, the 429s too, and the count resets when the window
  expires. 429 ``ThrottlerException`` with ``Retry-After: 60`` (here: the configured window).
  The guard puts its role limit in place of the limit a route's ``@Throttle`` names (login
  10/min, refresh 5/15 min), and its key holds no handler: a GET and a POST of one URL share
  one budget.
- ``POST /iot/devices`` (``iot-devices.controller.ts``, ``devices.service.ts``): the lookup
  ``findBySerialNumber`` tries the exact serial, then a case-insensitive *substring* match,
  then ANY active device. Found -> ``updateBySerialNumber(<the body's serial>)``, which looks
  the exact serial up again and throws when it is missing: the controller turns every error
  into a 400 BadRequestException. Hence an unknown serial is refused with 400 while any other
  active device (or a serial containing it) exists, and created only when none does. A
  device so created has no owner (``userId`` null, unless the body names one), so
  ``/devices/:id/*`` answers 403 to a non-admin account: only a device the operator created
  for the farm's account is usable. Update sets name, type, status (body or ONLINE),
  ``isActive`` true, ``lastSeen`` now, and location/IP/MAC/firmware when given.
- ``GET /iot/devices/serial/:serial``: the same lookup (so another device for an unknown
  serial), 404 only when nothing is active.
- ``PATCH /iot/devices/serial/:serial``: its body type is an intersection, so no validation
  runs; the body goes to Prisma as the update: any *column* is accepted (status, ipAddress,
  macAddress, firmware, name, location, and also description, isActive, type, serialNumber);
  ``lastSeen`` is overwritten with now; ``userId`` is dropped; anything else (``metadata``),
  a wrong type or status, and an unknown serial (the exact lookup, no fall-back) -> 400.
- ``/devices/:id/...`` (``devices.controller.ts``): JWT; ``findOne`` answers 404 for an unknown
  id and 403 when the device is not the account's (ADMIN/SUPER_ADMIN see all). Sensors: list
  the active ones; create needs role ADMIN/SUPER_ADMIN/GROWER (403 otherwise), takes the body
  as-is (``any``, no DTO): ``type`` is a free string (the schema's convention is lower case:
  temperature, humidity, co2, ph), a missing field, a wrong type or an unknown key is a Prisma
  validation error -> 500, and it neither checks the device exists (FK error, 500) nor owns it.
- ``POST /sensors/:id/data/batch`` (``sensors.service.ts``): ``{"data": [...]}`` must be an
  array (empty allowed: count 0); the items are NOT validated by the DTO (no
  ``@ValidateNested``): a non-number value or an unparseable timestamp fails in Prisma -> 500
  for the whole batch (nothing stored); a missing timestamp is "now". Stored with
  ``createMany``: no reading id, no dedupe, ``Idempotency-Key`` ignored. Unknown sensor 404.
  Any role; no ownership check.
- ``POST /devices/:id/command``: 400 for an OFFLINE device; creates the row ``pending``, then
  publishes on MQTT: connected -> ``sent``; not connected (the deployment) -> ``failed`` and a
  400. The replica's ``broker`` switch picks: ``none`` (default: the row stays ``pending``, the
  answer says so), ``up`` (``sent``), ``down`` (``failed`` + 400, as deployed).
- ``GET /devices/:id/commands``: newest first by ``sentAt``, 50. No acknowledgement route.
- ``GET /devices/:id/configuration``: the service's fixed placeholder.
- Login (200): the account must be verified; refresh (200): ``expiresIn`` in seconds (the
  route's documented example, 86400). The role is read from the account at each request, so
  a role switch takes effect at once (a guess: the JWT strategy was not read).

Test hooks (not §9, no auth, loopback only) under ``/__replica/``: ``POST devices`` (the
operator's admin dashboard), ``GET state``, ``POST faults``, ``POST role``. A request with the
header ``X-Replica-Client: NAME`` counts as from client NAME instead of its IP (rate limit,
history): the tests' calls as the apps, which in production come from elsewhere, then leave
the gateway's per-URL budget alone.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import string
import threading
import time
import uuid
from collections import Counter, defaultdict, deque
from urllib.parse import parse_qs, unquote, urlsplit

import jwt
from peewee import BooleanField, CharField, FloatField, Model, SqliteDatabase, TextField

from mash.devserver.schema import check_password, hash_password

log = logging.getLogger("mash.devserver")

PREFIX = "/api/v1"
HOOKS = "/__replica/"
MAX_BODY = 100 * 1024                 # body-parser's default limit, which Nest keeps
OTHER_SERIAL = "MASH-OTHER-FARM-0001"
OTHER_EMAIL = "grower@other-farm.example"
DEVICE_TYPES = ("MUSHROOM_CHAMBER", "ENVIRONMENTAL_SENSOR", "IRRIGATION_SYSTEM", "HVAC_CONTROLLER",
                "CAMERA", "pH_SENSOR", "HUMIDITY_CONTROLLER")
DEVICE_STATUSES = ("ONLINE", "OFFLINE", "MAINTENANCE", "ERROR")
COMMANDS = ("START", "STOP", "RESTART", "RESET", "CONFIGURE", "CALIBRATE", "UPDATE_FIRMWARE",
            "REQUEST_STATUS")
ROLES = ("USER", "ADMIN", "SUPER_ADMIN", "GROWER", "BUYER")
SENSOR_CREATORS = ("ADMIN", "SUPER_ADMIN", "GROWER")
ADMINS = ("ADMIN", "SUPER_ADMIN")
CSRF_EXEMPT = ("/api/v1/health", "/api/v1/metrics", "/api/v1/auth/login", "/api/v1/auth/register",
               "/api/v1/auth/verify-email-code", "/api/v1/auth/resend-verification-code",
               "/api/v1/auth/resend-verification", "/api/v1/auth/forgot-password",
               "/api/v1/auth/verify-reset-code", "/api/v1/auth/reset-password",
               "/api/v1/auth/resend-password-reset-code", "/api/v1/auth/google/sync",
               "/api/v1/auth/google/login", "/api/v1/auth/firebase", "/api/v1/auth/firebase-sync",
               "/api/v1/auth/oauth/callback", "/api/v1/webhook", "/api/v1/iot/devices",
               "/api/v1/users/me/apply-as-seller")
CONFIG_PLACEHOLDER = {"readingInterval": 60, "alertThresholds": {}, "operationSettings": {},
                      "notificationSettings": {}}
# PATCH /iot/devices/serial/:serial hands its body to Prisma: the Device columns it may set
_STR, _OPT = (str,), (str, type(None))
DEVICE_COLUMNS = {"name": _STR, "type": _STR, "serialNumber": _STR, "status": _STR,
                  "location": _OPT, "description": _OPT, "firmware": _OPT, "ipAddress": _OPT,
                  "macAddress": _OPT, "isActive": (bool,), "lastSeen": None, "userId": None}
SENSOR_FIELDS = {"type": _STR, "name": _STR, "unit": _STR, "minValue": (int, float, type(None)),
                 "maxValue": (int, float, type(None)), "calibration": None,
                 "isActive": (bool,), "deviceId": _STR}
STATUS_TEXT = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
               408: "Request Timeout", 413: "Payload Too Large", 429: "Too Many Requests",
               500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
               504: "Gateway Timeout"}
EXCEPTIONS = {400: "BadRequestException", 401: "UnauthorizedException", 403: "ForbiddenException",
              404: "NotFoundException", 408: "RequestTimeoutException",
              413: "PayloadTooLargeException", 429: "ThrottlerException",
              500: "InternalServerErrorException", 502: "BadGatewayException",
              503: "ServiceUnavailableException", 504: "GatewayTimeoutException"}

mashdb = SqliteDatabase(None)


class _M(Model):
    class Meta:
        database = mashdb


class Account(_M):
    uid = CharField(unique=True)
    email = CharField(unique=True)
    password_hash = CharField()
    role = CharField(default="GROWER")
    email_verified = BooleanField(default=True)


class Device(_M):
    uid = CharField(unique=True)
    name = CharField()
    type = CharField()
    serial_number = CharField(unique=True)
    status = CharField(default="OFFLINE")
    user_id = CharField(null=True)
    location = CharField(null=True)
    description = CharField(null=True)
    firmware = CharField(null=True)
    ip_address = CharField(null=True)
    mac_address = CharField(null=True)
    last_seen = CharField(null=True)
    is_active = BooleanField(default=True)
    created_at = CharField()
    updated_at = CharField()


class Sensor(_M):
    uid = CharField(unique=True)
    device = CharField(index=True)
    type = CharField()
    name = CharField()
    unit = CharField()
    min_value = FloatField(null=True)
    max_value = FloatField(null=True)
    calibration = TextField(null=True)
    is_active = BooleanField(default=True)
    created_at = CharField()
    updated_at = CharField()


class SensorData(_M):
    device = CharField()
    sensor = CharField(index=True)
    user_id = CharField()
    type = CharField()
    value = FloatField()
    unit = CharField()
    quality = CharField(null=True)
    timestamp = CharField()


class DeviceCommand(_M):
    uid = CharField(unique=True)
    device = CharField(index=True)
    command = CharField()
    parameters = TextField(null=True)
    status = CharField(default="pending")
    response = TextField(null=True)
    sent_at = CharField()
    acknowledged_at = CharField(null=True)


MODELS = [Account, Device, Sensor, SensorData, DeviceCommand]
_INSERT_DATA = ('INSERT INTO "sensordata" ("device", "sensor", "user_id", "type", "value", "unit", '
                '"quality", "timestamp") VALUES (?, ?, ?, ?, ?, ?, ?, ?)')
_ALNUM = string.ascii_lowercase + string.digits


def cuid() -> str:
    """An id shaped like Prisma's cuid(): "c" and 24 lower-case letters and digits."""
    return "c" + "".join(secrets.choice(_ALNUM) for _ in range(24))


def js_now() -> str:
    return js_iso(dt.datetime.now(dt.timezone.utc))


def js_iso(when: dt.datetime) -> str:
    """``Date.prototype.toISOString``: UTC, milliseconds, Z."""
    when = when.astimezone(dt.timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def js_date(value) -> str | None:
    """``new Date(value)`` as Prisma would store it, or None for an Invalid Date."""
    if isinstance(value, bool):
        return None
    try:
        if isinstance(value, (int, float)):
            return js_iso(dt.datetime.fromtimestamp(value / 1000, dt.timezone.utc))
        if isinstance(value, str):
            s = value.strip().replace("Z", "+00:00").replace("z", "+00:00")
            when = dt.datetime.fromisoformat(s)
            if when.tzinfo is None:      # local time to JS: the deployment's is UTC
                when = when.replace(tzinfo=dt.timezone.utc)
            return js_iso(when)
    except (ValueError, OverflowError, OSError):
        return None
    return None


def _is_str(v) -> bool:
    return isinstance(v, str)


def _is_bool(v) -> bool:
    return isinstance(v, bool)


def _column(key: str) -> str:
    return {"serialNumber": "serial_number", "ipAddress": "ip_address",
            "macAddress": "mac_address", "isActive": "is_active"}.get(key, key)


def _cookies(header: str) -> dict:
    out = {}
    for part in header.split(";"):
        name, _, value = part.strip().partition("=")
        if name:
            out[name] = value
    return out


class Refusal(Exception):
    """An exception the catch-all filter turns into the JSON error; ``detail`` is logged only."""

    def __init__(self, status: int, detail: str, kind: str | None = None, headers=None):
        super().__init__(detail)
        self.status, self.detail = status, detail
        self.kind = kind or EXCEPTIONS.get(status, "HttpException")
        self.headers = headers or {}


class HTMLRefusal(Exception):
    """Express's own error page (middleware outside Nest: CSRF, body parser)."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


class Reply:
    """What the handler writes: status, headers, body; or ``lose`` (close without answering)."""

    def __init__(self, status: int, body: bytes, headers: dict, lose: bool = False):
        self.status, self.body, self.headers, self.lose = status, body, headers, lose


def html_page(status: int) -> bytes:
    """finalhandler's page in production: the status text only."""
    return ('<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            '<title>Error</title>\n</head>\n<body>\n'
            f'<pre>{STATUS_TEXT.get(status, "Error")}</pre>\n</body>\n</html>\n').encode()


class Faults:
    """Switches the tests flip through ``POST /__replica/faults``."""

    def __init__(self):
        self.latency = 0.0
        self.fail_next, self.fail_status, self.fail_path = 0, 503, ""
        self.drop_until = 0.0
        self.lose_answer_next, self.lose_path = 0, ""
        self.broker = "none"       # none: a command stays pending; up: sent; down: failed + 400

    def as_dict(self) -> dict:
        return {"latency": self.latency, "fail_next": self.fail_next,
                "fail_status": self.fail_status, "fail_path": self.fail_path,
                "drop_for": max(0.0, self.drop_until - time.monotonic()),
                "lose_answer_next": self.lose_answer_next, "lose_path": self.lose_path,
                "broker": self.broker}


class MashBackend:
    """The replica's state and rules; ``handle`` takes one parsed request, returns a Reply."""

    profile = "mash"

    def __init__(self, db_path: str, secret: str | None = None, access_ttl: float = 86400.0,
                 refresh_ttl: float = 30 * 86400.0, rate_limit: int = 20,
                 rate_window: float = 60.0, users: list[tuple[str, str]] = (),
                 populated: bool = True):
        mashdb.init(db_path, pragmas={"journal_mode": "wal", "synchronous": 0}, timeout=30,
                    check_same_thread=False)
        mashdb.connect(reuse_if_open=True)
        mashdb.create_tables(MODELS)
        self.secret = secret or secrets.token_hex(32)
        self.refresh_secret = hashlib.sha256(self.secret.encode() + b"refresh").hexdigest()
        self.csrf_key = secrets.token_bytes(32)
        self.access_ttl, self.refresh_ttl = access_ttl, refresh_ttl
        self.rate_limit, self.rate_window = rate_limit, rate_window
        self.lock = threading.RLock()
        self.faults = Faults()
        self.windows: dict = {}                       # (ip, url) -> [window start, hits]
        self.requests = self.throttled = self.lost = 0
        self.health: list[dict] = []           # POST /devices/:id/health records
        self.per_path: Counter = Counter()
        self.history: deque = deque(maxlen=100000)    # one dict per routed request
        self.seeded = [email for email, _ in users]
        for email, password in users:
            if not Account.select().where(Account.email == email).exists():
                Account.create(uid=cuid(), email=email, password_hash=hash_password(password))
        if populated and not Device.select().where(Device.serial_number == OTHER_SERIAL).exists():
            other = Account.get_or_none(Account.email == OTHER_EMAIL) or Account.create(
                uid=cuid(), email=OTHER_EMAIL, password_hash=hash_password(secrets.token_hex(8)))
            self._new_device(OTHER_SERIAL, "Other farm chamber", owner=other.uid, status="ONLINE",
                             last_seen=js_now())

    # -- the request pipeline ---------------------------------------------------------------
    def handle(self, method: str, target: str, headers, raw: bytes, ip: str) -> Reply | None:
        """One request. None: drop the connection (the ``drop_for`` fault)."""
        path = urlsplit(target).path
        if path.startswith(HOOKS):
            return self._hook(method, path[len(HOOKS):], target, raw)
        f = self.faults
        if f.drop_until > time.monotonic():
            return None
        if f.latency:
            time.sleep(f.latency)
        arrived = time.monotonic()
        # the tests' own calls as the apps (commands, sensors) come from 127.0.0.1 too: this
        # header, read by the replica only, counts them as another client, as the apps are
        client = headers.get("X-Replica-Client") or ip
        corr = headers.get("X-Correlation-Id") or headers.get("X-Request-Id") or str(uuid.uuid4())
        out = {"X-Correlation-Id": corr, "X-Request-Id": corr}
        ctx = {"method": method, "url": target, "corr": headers.get("X-Correlation-Id")}
        lose = False
        try:
            with self.lock:
                self.requests += 1
                self.per_path[f"{method} {path}"] += 1
                if f.fail_next > 0 and f.fail_path in path:
                    f.fail_next -= 1
                    raise Refusal(f.fail_status, "fault switch fail_next",
                                  headers={"Retry-After": str(int(self.rate_window))}
                                  if f.fail_status == 429 else None)
                if f.lose_answer_next > 0 and f.lose_path in path:
                    f.lose_answer_next -= 1
                    lose = True
            status, payload = self._pipeline(method, target, path, headers, raw, client, out)
            body = {"success": True, "statusCode": status, "data": payload,
                    "timestamp": js_now(), "path": target, "correlationId": corr}
            reply = Reply(status, json.dumps(body).encode(),
                          {**out, "Content-Type": "application/json; charset=utf-8"})
        except HTMLRefusal as err:
            log.info("replica %s %s -> %d (%s)", method, target, err.status, err.detail)
            reply = Reply(err.status, html_page(err.status),
                          {**out, "Content-Type": "text/html; charset=utf-8",
                           "Content-Security-Policy": "default-src 'none'",
                           "X-Content-Type-Options": "nosniff"})
        except Refusal as err:
            log.info("replica %s %s -> %d %s (%s)", method, target, err.status, err.kind, err.detail)
            reply = self._error(err, ctx, out)
        except Exception as exc:      # a bug here must be a 500, not a dropped connection
            log.exception("replica error")
            reply = self._error(Refusal(500, str(exc), "Error"), ctx, out)
        with self.lock:
            if reply.status == 429:
                self.throttled += 1
            self.history.append({"t": arrived, "answered": time.monotonic(), "client": client,
                                 "method": method, "url": target, "status": reply.status})
            if lose:
                self.lost += 1
                reply.lose = True
        return reply

    def _error(self, err: Refusal, ctx: dict, out: dict) -> Reply:
        body = {"success": False, "statusCode": err.status, "timestamp": js_now(),
                "path": ctx["url"], "method": ctx["method"]}
        if ctx["corr"]:
            body["correlationId"] = ctx["corr"]
        body["error"] = {"type": err.kind, "code": "INTERNAL_SERVER_ERROR",
                         "message": "An unexpected error occurred"}
        return Reply(err.status, json.dumps(body).encode(),
                     {**out, **err.headers, "Content-Type": "application/json; charset=utf-8"})

    def _pipeline(self, method, target, path, headers, raw, ip, out) -> tuple[int, object]:
        self._csrf(method, path, headers, out)
        body = self._parse_body(headers, raw)
        route = self._route(method, path)
        if route is None:
            raise Refusal(404, f"Cannot {method} {path}")
        name, args, auth = route
        with self.lock:
            self._throttle(ip, target, out)
            user = self._authenticate(headers.get("Authorization")) if auth else None
            return getattr(self, name)(*args, body=body, user=user, headers=headers)

    def _csrf(self, method: str, path: str, headers, out: dict) -> None:
        cookies = _cookies(headers.get("Cookie", ""))
        if method in ("GET", "HEAD", "OPTIONS"):
            secret = cookies.get("_csrf_secret")
            if not secret:
                secret = secrets.token_hex(32)
                out["Set-Cookie"] = f"_csrf_secret={secret}; Path=/; HttpOnly; SameSite=Strict"
            out["X-CSRF-Token"] = self._csrf_token(secret)
            return
        if any(path.startswith(p) for p in CSRF_EXEMPT) or headers.get("X-API-Key"):
            return
        token = headers.get("X-CSRF-Token") or headers.get("X-XSRF-Token")
        secret = cookies.get("_csrf_secret")
        if not token or not secret:
            raise HTMLRefusal(403, "CSRF token missing")
        stamp, _, sig = token.partition(".")
        if (not stamp.isdigit() or time.time() * 1000 - int(stamp) > 86400_000
                or not hmac.compare_digest(sig, self._csrf_token(secret, stamp).partition(".")[2])):
            raise HTMLRefusal(403, "Invalid CSRF token")

    def _csrf_token(self, secret: str, stamp: str | None = None) -> str:
        stamp = stamp or str(int(time.time() * 1000))
        return stamp + "." + hmac.new(self.csrf_key, f"{secret}:{stamp}".encode(),
                                      hashlib.sha256).hexdigest()

    @staticmethod
    def _parse_body(headers, raw: bytes):
        ctype = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
        json_body = ctype == "application/json" or ctype.endswith("+json")
        # Nest mounts the json and urlencoded parsers, both with body-parser's 100 kB limit
        if (json_body or ctype == "application/x-www-form-urlencoded") and len(raw) > MAX_BODY:
            raise HTMLRefusal(413, "request entity too large")
        if not json_body:
            return {}
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except ValueError:
            raise HTMLRefusal(400, "malformed JSON") from None
        if not isinstance(body, (dict, list)):       # body-parser's strict mode
            raise HTMLRefusal(400, "JSON body must be an object or an array")
        return body

    _ROUTES = [
        ("POST", r"auth/login", "login", False),
        ("POST", r"auth/refresh", "refresh", False),
        ("POST", r"iot/devices", "iot_register", False),
        ("GET", r"iot/devices/serial/([^/]+)", "iot_get", False),
        ("PATCH", r"iot/devices/serial/([^/]+)", "iot_patch", False),
        ("GET", r"devices/([^/]+)/sensors", "list_sensors", True),
        ("POST", r"devices/([^/]+)/sensors", "add_sensor", True),
        ("POST", r"devices/([^/]+)/command", "send_command", True),
        ("GET", r"devices/([^/]+)/commands", "list_commands", True),
        ("GET", r"devices/([^/]+)/configuration", "configuration", True),
        ("POST", r"devices/([^/]+)/health", "post_health", True),
        ("POST", r"sensors/([^/]+)/data/batch", "batch_ingest", True),
    ]

    def _route(self, method: str, path: str):
        if not path.startswith(PREFIX + "/"):
            return None
        sub = path[len(PREFIX) + 1:].rstrip("/")
        for m, pattern, name, auth in self._ROUTES:
            match = re.fullmatch(pattern, sub)
            if match and m == method:
                return name, tuple(unquote(g) for g in match.groups()), auth
        return None

    def _throttle(self, ip: str, url: str, out: dict) -> None:
        if not self.rate_limit:
            return
        now = time.monotonic()
        key = (ip, url)
        window = self.windows.get(key)
        if window is None or now >= window[0] + self.rate_window:
            window = self.windows[key] = [now, 0]
        window[1] += 1
        out["X-RateLimit-Limit"] = str(self.rate_limit)
        out["X-RateLimit-Reset"] = str(math.ceil(time.time() + self.rate_window))
        if window[1] > self.rate_limit:
            raise Refusal(429, "ThrottlerException: Too Many Requests",
                          headers={"Retry-After": str(int(self.rate_window))})

    # -- tokens ---------------------------------------------------------------------------
    def _tokens(self, account: Account) -> tuple[str, str]:
        now = int(time.time())
        claims = {"sub": account.uid, "email": account.email, "role": account.role, "iat": now}
        access = jwt.encode({**claims, "exp": now + int(math.ceil(self.access_ttl))},
                            self.secret, algorithm="HS256")
        refresh = jwt.encode({**claims, "exp": now + int(math.ceil(self.refresh_ttl)),
                              "jti": uuid.uuid4().hex}, self.refresh_secret, algorithm="HS256")
        return access, refresh

    def _authenticate(self, header: str | None) -> Account:
        if not header or not header.startswith("Bearer "):
            raise Refusal(401, "No auth token")
        try:
            claims = jwt.decode(header[7:], self.secret, algorithms=["HS256"])
        except jwt.InvalidTokenError as exc:
            raise Refusal(401, f"token refused: {exc}") from None
        account = Account.get_or_none(Account.uid == claims.get("sub"))
        if account is None:
            raise Refusal(401, "unknown account")
        return account

    @staticmethod
    def _dto(body, fields: dict, required=()) -> dict:
        """The validation pipe: an object, whitelisted keys (forbidNonWhitelisted), types."""
        if not isinstance(body, dict):
            raise Refusal(400, "body must be an object")
        unknown = set(body) - set(fields)
        if unknown:
            raise Refusal(400, f"property {sorted(unknown)[0]} should not exist")
        for name in required:
            if body.get(name) in (None, ""):
                raise Refusal(400, f"{name} should not be empty")
        for name, check in fields.items():
            if name in body and body[name] is not None and not check(body[name]):
                raise Refusal(400, f"{name} is invalid")
        return body

    # -- auth -----------------------------------------------------------------------------
    def login(self, body, **_) -> tuple[int, dict]:
        self._dto(body, {"email": _is_str, "password": _is_str}, ("email", "password"))
        account = Account.get_or_none(Account.email == body["email"])
        if account is None or not check_password(body["password"], account.password_hash):
            raise Refusal(401, "Invalid credentials")
        if not account.email_verified:
            raise Refusal(401, "Email not verified")
        access, refresh = self._tokens(account)
        return 200, {"accessToken": access, "refreshToken": refresh,
                     "user": {"id": account.uid, "email": account.email, "role": account.role,
                              "emailVerified": account.email_verified}}

    def refresh(self, body, **_) -> tuple[int, dict]:
        self._dto(body, {"refreshToken": _is_str}, ("refreshToken",))
        try:
            claims = jwt.decode(body["refreshToken"], self.refresh_secret, algorithms=["HS256"])
        except jwt.InvalidTokenError as exc:
            raise Refusal(401, f"refresh token refused: {exc}") from None
        account = Account.get_or_none(Account.uid == claims.get("sub"))
        if account is None:
            raise Refusal(401, "unknown account")
        access, refresh = self._tokens(account)
        return 200, {"accessToken": access, "refreshToken": refresh,
                     "expiresIn": int(math.ceil(self.access_ttl))}

    # -- /iot/devices -----------------------------------------------------------------------
    @staticmethod
    def _iot_json(d: Device) -> dict:
        """The ``select`` of findBySerialNumber / updateBySerialNumber."""
        return {"id": d.uid, "name": d.name, "type": d.type, "serialNumber": d.serial_number,
                "status": d.status, "location": d.location, "description": d.description,
                "firmware": d.firmware, "ipAddress": d.ip_address, "macAddress": d.mac_address,
                "lastSeen": d.last_seen, "isActive": d.is_active, "createdAt": d.created_at,
                "updatedAt": d.updated_at}

    def _full_json(self, d: Device) -> dict:
        """A created row with ``include: {user: ...}``."""
        owner = Account.get_or_none(Account.uid == d.user_id) if d.user_id else None
        return {**self._iot_json(d), "userId": d.user_id,
                "user": {"id": owner.uid, "firstName": None, "lastName": None,
                         "email": owner.email} if owner else None}

    @staticmethod
    def _find_by_serial(serial: str) -> Device | None:
        """findBySerialNumber: exact, then case-insensitive substring, then ANY active device."""
        exact = Device.get_or_none(Device.serial_number == serial)
        if exact:
            return exact
        needle = serial.lower()
        for d in Device.select().order_by(Device.id):
            if needle in d.serial_number.lower():
                return d
        return Device.select().where(Device.is_active == True).order_by(Device.id).first()  # noqa: E712

    def _new_device(self, serial, name, owner=None, status="OFFLINE", last_seen=None,
                    type="MUSHROOM_CHAMBER", **cols) -> Device:
        now = js_now()
        return Device.create(uid=cuid(), serial_number=serial, name=name, type=type,
                             status=status, user_id=owner, last_seen=last_seen, created_at=now,
                             updated_at=now, **cols)

    IOT_DTO = {"name": lambda v: _is_str(v) and 0 < len(v) <= 100,
               "type": lambda v: v in DEVICE_TYPES, "serialNumber": _is_str,
               "location": lambda v: _is_str(v) and len(v) <= 200, "firmware": _is_str,
               "ipAddress": _is_str, "macAddress": _is_str,
               "status": lambda v: v in DEVICE_STATUSES, "isActive": _is_bool, "userId": _is_str}

    def iot_register(self, body, **_) -> tuple[int, dict]:
        dto = self._dto(body, self.IOT_DTO, ("name", "type", "serialNumber"))
        serial = dto["serialNumber"]
        existing = self._find_by_serial(serial)
        if existing:
            device = Device.get_or_none(Device.serial_number == serial)
            if device is None:     # the fall-back found another device: the update throws
                raise Refusal(400, f"Failed to register device: Device with serial number "
                                   f"{serial} not found")
            changes = {"name": dto["name"], "type": dto["type"],
                       "status": dto.get("status") or "ONLINE", "last_seen": js_now(),
                       "is_active": True, "updated_at": js_now()}
            for key, col in (("location", "location"), ("ipAddress", "ip_address"),
                             ("macAddress", "mac_address"), ("firmware", "firmware")):
                if dto.get(key) is not None:
                    changes[col] = dto[key]
            Device.update(**changes).where(Device.id == device.id).execute()
            return 201, {"success": True, "message": "Device updated successfully",
                         "data": self._iot_json(Device.get_by_id(device.id))}
        owner = dto.get("userId")
        if owner and not Account.select().where(Account.uid == owner).exists():
            raise Refusal(400, "Failed to register device: foreign key constraint failed")
        device = self._new_device(serial, dto["name"], owner=owner or None, type=dto["type"],
                                  status=dto.get("status") or "ONLINE", last_seen=js_now(),
                                  location=dto.get("location"), firmware=dto.get("firmware"),
                                  ip_address=dto.get("ipAddress"),
                                  mac_address=dto.get("macAddress"))
        return 201, {"success": True, "message": "Device registered successfully",
                     "data": self._full_json(device)}

    def iot_get(self, serial, **_) -> tuple[int, dict]:
        device = self._find_by_serial(serial)
        if device is None:
            raise Refusal(404, f"Device with serial number {serial} not found")
        return 200, {"success": True, "message": "Device found", "data": self._iot_json(device)}

    def iot_patch(self, serial, body, **_) -> tuple[int, dict]:
        if not isinstance(body, dict):
            raise Refusal(400, "Failed to update device: body must be an object")
        device = Device.get_or_none(Device.serial_number == serial)
        if device is None:
            raise Refusal(400, f"Failed to update device: Device with serial number {serial} "
                               "not found")
        changes = {}
        for key, value in body.items():
            if key not in DEVICE_COLUMNS:
                raise Refusal(400, f"Failed to update device: Unknown argument `{key}`")
            kinds = DEVICE_COLUMNS[key]
            if kinds is not None and not (isinstance(value, kinds) and not
                                          (bool not in kinds and isinstance(value, bool))):
                raise Refusal(400, f"Failed to update device: invalid value for {key}")
            if key == "status" and value not in DEVICE_STATUSES:
                raise Refusal(400, f"Failed to update device: invalid status {value!r}")
            if key == "type" and value not in DEVICE_TYPES:
                raise Refusal(400, f"Failed to update device: invalid type {value!r}")
            if key == "serialNumber" and value != serial and Device.select().where(
                    Device.serial_number == value).exists():
                raise Refusal(400, "Failed to update device: Unique constraint failed")
            if key in ("lastSeen", "userId"):
                continue             # lastSeen: the controller's now; userId: dropped
            changes[_column(key)] = value
        now = js_now()
        Device.update(**changes, last_seen=now, updated_at=now).where(
            Device.id == device.id).execute()
        return 200, {"success": True, "message": "Device updated successfully",
                     "data": self._iot_json(Device.get_by_id(device.id))}

    # -- /devices/:id -----------------------------------------------------------------------
    @staticmethod
    def _find_one(cuid_: str, user: Account) -> Device:
        device = Device.get_or_none(Device.uid == cuid_)
        if device is None:
            raise Refusal(404, "Device not found")
        if device.user_id != user.uid and user.role not in ADMINS:
            raise Refusal(403, "You do not have permission to view this device")
        return device

    @staticmethod
    def _sensor_json(s: Sensor) -> dict:
        return {"id": s.uid, "deviceId": s.device, "type": s.type, "name": s.name,
                "unit": s.unit, "minValue": s.min_value, "maxValue": s.max_value,
                "calibration": json.loads(s.calibration) if s.calibration else None,
                "isActive": s.is_active, "createdAt": s.created_at, "updatedAt": s.updated_at}

    def list_sensors(self, cuid_, user, **_) -> tuple[int, dict]:
        self._find_one(cuid_, user)
        rows = Sensor.select().where((Sensor.device == cuid_) & (Sensor.is_active == True))  # noqa: E712
        return 200, {"sensors": [self._sensor_json(s) for s in rows.order_by(Sensor.id)]}

    def add_sensor(self, cuid_, body, user, **_) -> tuple[int, dict]:
        if user.role not in SENSOR_CREATORS:
            raise Refusal(403, "Forbidden resource")
        if not isinstance(body, dict):
            raise Refusal(500, "Argument `data` must be an object", "PrismaClientValidationError")
        for key, value in body.items():
            kinds = SENSOR_FIELDS.get(key, ())
            if key not in SENSOR_FIELDS or (kinds is not None and (
                    not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)))):
                raise Refusal(500, f"Invalid or unknown argument `{key}`",
                              "PrismaClientValidationError")
        for key in ("type", "name", "unit"):
            if key not in body:
                raise Refusal(500, f"Argument `{key}` is missing", "PrismaClientValidationError")
        device = body.get("deviceId", cuid_)
        if not Device.select().where(Device.uid == device).exists():
            raise Refusal(500, "Foreign key constraint failed on the field: `deviceId`",
                          "PrismaClientKnownRequestError")
        now = js_now()
        sensor = Sensor.create(uid=cuid(), device=device, type=body["type"], name=body["name"],
                               unit=body["unit"], min_value=body.get("minValue"),
                               max_value=body.get("maxValue"),
                               calibration=json.dumps(body["calibration"])
                               if body.get("calibration") is not None else None,
                               is_active=body.get("isActive", True), created_at=now, updated_at=now)
        return 201, self._sensor_json(sensor)

    def batch_ingest(self, sensor_id, body, user, **_) -> tuple[int, dict]:
        self._dto(body, {"data": lambda v: isinstance(v, list)}, ())
        if not isinstance(body.get("data"), list):
            raise Refusal(400, "data must be an array")
        sensor = Sensor.get_or_none(Sensor.uid == sensor_id)
        if sensor is None:
            raise Refusal(404, "Sensor not found")
        rows, now = [], js_now()
        for i, point in enumerate(body["data"]):
            point = point if isinstance(point, dict) else {}
            value, stamp = point.get("value"), point.get("timestamp")
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise Refusal(500, f"data[{i}].value: expected a Float",
                              "PrismaClientValidationError")
            when = js_date(stamp) if stamp not in (None, "", 0, False) else now
            if when is None:
                raise Refusal(500, f"data[{i}].timestamp: Invalid Date",
                              "PrismaClientValidationError")
            quality = (point.get("metadata") or {}).get("quality") \
                if isinstance(point.get("metadata"), dict) else None
            rows.append((sensor.device, sensor.uid, user.uid, sensor.type, float(value),
                         sensor.unit, quality or "good", when))
        with mashdb.atomic():
            mashdb.connection().executemany(_INSERT_DATA, rows)
        return 201, {"success": True, "count": len(rows)}

    @staticmethod
    def _command_json(c: DeviceCommand) -> dict:
        return {"id": c.uid, "deviceId": c.device, "command": c.command,
                "parameters": json.loads(c.parameters) if c.parameters else None,
                "status": c.status, "response": json.loads(c.response) if c.response else None,
                "sentAt": c.sent_at, "acknowledgedAt": c.acknowledged_at}

    def send_command(self, cuid_, body, user, **_) -> tuple[int, dict]:
        dto = self._dto(body, {"command": lambda v: v in COMMANDS,
                               "parameters": lambda v: isinstance(v, dict)}, ("command",))
        device = self._find_one(cuid_, user)
        if device.status == "OFFLINE":
            raise Refusal(400, "Cannot send command to offline device")
        cmd = DeviceCommand.create(uid=cuid(), device=cuid_, command=dto["command"],
                                   parameters=json.dumps(dto.get("parameters") or {}),
                                   sent_at=js_now())
        broker = self.faults.broker
        if broker == "down":
            DeviceCommand.update(status="failed").where(DeviceCommand.id == cmd.id).execute()
            raise Refusal(400, "Failed to send command to device")
        status = "sent" if broker == "up" else "pending"
        DeviceCommand.update(status=status).where(DeviceCommand.id == cmd.id).execute()
        return 201, {"message": "Command sent successfully", "commandId": cmd.uid,
                     "status": status}

    def list_commands(self, cuid_, user, **_) -> tuple[int, dict]:
        self._find_one(cuid_, user)
        rows = (DeviceCommand.select().where(DeviceCommand.device == cuid_)
                .order_by(DeviceCommand.sent_at.desc(), DeviceCommand.id.desc()).limit(50))
        return 200, {"commands": [self._command_json(c) for c in rows]}

    HEALTH_FIELDS = ("cpuUsage", "memoryUsage", "diskUsage", "temperature", "batteryLevel",
                     "networkLatency", "uptime", "errorCount")

    def post_health(self, cuid_, body, user, **_) -> tuple[int, dict]:
        """A ``DeviceHealth`` record (its columns, numbers; CONTRACT §9 names them): kept
        in memory, listed by the state hook as ``health``."""
        self._dto(body, {k: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                         for k in self.HEALTH_FIELDS})
        self._find_one(cuid_, user)
        record = {"deviceId": cuid_, "timestamp": js_now(), **body}
        self.health.append(record)
        return 201, record

    def configuration(self, cuid_, user, **_) -> tuple[int, dict]:
        self._find_one(cuid_, user)
        return 200, {"deviceId": cuid_, "configuration": json.loads(json.dumps(CONFIG_PLACEHOLDER))}

    # -- test hooks ---------------------------------------------------------------------------
    def _hook(self, method: str, sub: str, target: str, raw: bytes) -> Reply:
        try:
            body = json.loads(raw) if raw.strip() else {}
            with self.lock:
                if method == "POST" and sub == "devices":
                    payload = self.hook_create_device(body)
                elif method == "GET" and sub == "state":
                    serial = parse_qs(urlsplit(target).query).get("serial", [None])[0]
                    payload = self.hook_state(serial)
                elif method == "POST" and sub == "faults":
                    payload = self.hook_faults(body)
                elif method == "POST" and sub == "role":
                    payload = self.hook_role(body)
                else:
                    return Reply(404, json.dumps({"error": f"no hook {method} {sub}"}).encode(),
                                 {"Content-Type": "application/json"})
            return Reply(200, json.dumps(payload).encode(), {"Content-Type": "application/json"})
        except (ValueError, KeyError, TypeError) as exc:
            return Reply(400, json.dumps({"error": str(exc)}).encode(),
                         {"Content-Type": "application/json"})

    def hook_create_device(self, body: dict) -> dict:
        """The operator creates the farm's device in the admin dashboard (owner: the account)."""
        serial = body["serialNumber"]
        if not isinstance(serial, str) or not serial:
            raise ValueError("serialNumber must be a non-empty string")
        if Device.select().where(Device.serial_number == serial).exists():
            raise ValueError(f"a device with serial {serial} exists")
        email = body.get("owner") or (self.seeded[0] if self.seeded else None)
        owner = Account.get_or_none(Account.email == email) if email else None
        if email and owner is None:
            raise ValueError(f"no account {email}")
        device = self._new_device(serial, body.get("name") or serial,
                                  owner=owner.uid if owner else None,
                                  status=body.get("status", "OFFLINE"))
        return self._full_json(device)

    def hook_state(self, serial: str | None) -> dict:
        devices = list(Device.select().order_by(Device.id))
        if serial:
            devices = [d for d in devices if d.serial_number == serial]
        ids = {d.uid for d in devices}
        sensors = [s for s in Sensor.select().order_by(Sensor.id) if s.device in ids]
        counts = defaultdict(int)
        readings = defaultdict(list)
        wanted = {s.uid for s in sensors}
        for value, stamp, sensor in mashdb.execute_sql(
                'SELECT "value", "timestamp", "sensor" FROM "sensordata" ORDER BY "id"'):
            if sensor in wanted:
                counts[sensor] += 1
                readings[sensor].append([value, stamp])
        return {
            "devices": [self._full_json(d) for d in devices],
            "sensors": [{**self._sensor_json(s), "readings": counts[s.uid]} for s in sensors],
            "readings": dict(readings),
            "commands": [self._command_json(c) for c in DeviceCommand.select().order_by(
                DeviceCommand.id) if c.device in ids],
            "accounts": [{"id": a.uid, "email": a.email, "role": a.role} for a in Account.select()],
            "requests": self.requests, "throttled": self.throttled, "lost": self.lost,
            "per_path": dict(self.per_path),
            "history": list(self.history),
            "rate_limit": self.rate_limit, "rate_window": self.rate_window,
            "faults": self.faults.as_dict(),
            "health": [h for h in self.health if h["deviceId"] in ids],
        }

    def hook_faults(self, body: dict) -> dict:
        f = self.faults
        if "latency" in body:
            f.latency = float(body["latency"])
        if "fail_next" in body:
            f.fail_next = int(body["fail_next"])
            f.fail_status = int(body.get("fail_status", 503))
            f.fail_path = str(body.get("fail_path", ""))
        if "drop_for" in body:
            f.drop_until = time.monotonic() + float(body["drop_for"])
        if "lose_answer_next" in body:
            f.lose_answer_next = int(body["lose_answer_next"])
            f.lose_path = str(body.get("lose_path", ""))
        if "broker" in body:
            if body["broker"] not in ("none", "up", "down"):
                raise ValueError("broker must be none, up or down")
            f.broker = body["broker"]
        if "rate_limit" in body:
            self.rate_limit = int(body["rate_limit"])
            self.rate_window = float(body.get("rate_window", self.rate_window))
        if body.get("reset_rate") or "rate_limit" in body:
            self.windows.clear()
        return f.as_dict()

    def hook_role(self, body: dict) -> dict:
        role = body["role"]
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        email = body.get("email") or (self.seeded[0] if self.seeded else None)
        if not Account.update(role=role).where(Account.email == email).execute():
            raise ValueError(f"no account {email}")
        return {"email": email, "role": role}

