"""The reference backend: a stand-in for the MASH NestJS backend, on loopback only.

Every endpoint of CONTRACT.md section 2 under ``/api/v1``, with the validation, envelope, JWT
lifetimes and 429s of the real one, persisted to SQLite through peewee. It is what local runs
and the tests talk to over real HTTP. Faithful, not convenient: it rejects what the real
backend would reject. Admin endpoints (``/api/v1/admin/...``, no auth, loopback only) issue
commands, inspect what arrived and switch faults on (503s, latency, dropped connections).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import os
import re
import secrets
import threading
import time
import uuid
from collections import defaultdict, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import jwt
import requests
from peewee import (CharField, DateTimeField, FloatField, IntegerField, Model, SqliteDatabase,
                    TextField, fn)

from mash.config import Settings
from mash.contract import DEVICE_STATUSES, ROOMS, SEVERITIES
from mash.logs import setup_logging

log = logging.getLogger("mash.devserver")

devdb = SqliteDatabase(None)
MAX_BODY = 5 * 1024 * 1024
MAX_READINGS = 1000


class _M(Model):
    class Meta:
        database = devdb


class User(_M):
    email = CharField(unique=True)
    password_hash = CharField()
    role = CharField(default="GROWER")
    refresh_jti = CharField(null=True)


class Device(_M):
    serial_number = CharField(unique=True)
    uid = CharField()
    name = CharField()
    type = CharField()
    location = CharField(null=True)
    firmware = CharField(null=True)
    status = CharField(default="OFFLINE")
    last_seen = CharField(null=True)
    metadata = TextField(default="{}")
    updates = IntegerField(default=0)


class Reading(_M):
    device = CharField()
    reading_id = CharField()
    room = CharField()
    temperature = FloatField()
    humidity = FloatField()
    co2 = FloatField()
    timestamp = CharField()

    class Meta:
        indexes = ((("device", "reading_id"), True),)


_INSERT_READING = ('INSERT OR IGNORE INTO "reading" ("device", "reading_id", "room", "temperature", '
                   '"humidity", "co2", "timestamp") VALUES (?, ?, ?, ?, ?, ?, ?)')


class IdempotentResponse(_M):
    key = CharField(unique=True)
    body = TextField()


class DevCommand(_M):
    command_id = CharField(unique=True)
    device = CharField()
    command = CharField()
    parameters = TextField(default="{}")
    status = CharField(default="pending")
    created_at = DateTimeField()
    sent_at = CharField(null=True)
    expires_at = CharField(null=True)
    response = TextField(null=True)
    acknowledged_at = CharField(null=True)
    acks = IntegerField(default=0)


class DevAlert(_M):
    device = CharField()
    event_type = CharField()
    severity = CharField()
    message = TextField()
    data = TextField()
    triggered_at = CharField()


class DeviceConfiguration(_M):
    device = CharField(unique=True)
    body = TextField()


MODELS = [User, Device, Reading, IdempotentResponse, DevCommand, DevAlert, DeviceConfiguration]


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(8)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, 10_000)
    return salt.hex() + "$" + digest.hex()


def check_password(password: str, stored: str) -> bool:
    salt, _ = stored.split("$", 1)
    return secrets.compare_digest(hash_password(password, bytes.fromhex(salt)), stored)


def _iso_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _is_iso(value) -> bool:
    if not isinstance(value, str) or not 10 <= len(value) <= 40:
        return False
    try:
        dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        return True
    except ValueError:
        return False


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message = status, message
        self.kind = kind or {400: "BAD_REQUEST", 401: "UNAUTHORIZED", 403: "FORBIDDEN",
                             404: "NOT_FOUND", 409: "CONFLICT", 413: "PAYLOAD_TOO_LARGE",
                             429: "TOO_MANY_REQUESTS", 503: "SERVICE_UNAVAILABLE"}.get(status, "ERROR")
        self.headers = headers or {}


class Faults:
    """Switches the tests flip through ``POST /api/v1/admin/faults``."""

    def __init__(self):
        self.fail_next = 0
        self.fail_after = 0          # let this many requests through before fail_next starts
        self.fail_status = 503
        self.latency = 0.0
        self.drop_until = 0.0
        self.bare = False            # answer bodies without the envelope

    def as_dict(self):
        return {"fail_next": self.fail_next, "fail_after": self.fail_after,
                "fail_status": self.fail_status,
                "latency": self.latency, "drop_for": max(0.0, self.drop_until - time.monotonic()),
                "bare": self.bare}


class Backend:
    """The backend's state and rules, independent of HTTP (the handler below is a thin shell)."""

    def __init__(self, db_path: str, secret: str | None = None, access_ttl: float = 900.0,
                 refresh_ttl: float = 604800.0, rate_limit: int = 0, rate_window: float = 60.0,
                 users: list[tuple[str, str]] = ()):
        os.makedirs(os.path.dirname(os.path.abspath(db_path)), exist_ok=True)
        # A test server: synchronous=OFF keeps it fast; it is not where data lives.
        devdb.init(db_path, pragmas={"journal_mode": "wal", "synchronous": 0}, timeout=30,
                   check_same_thread=False)
        devdb.connect(reuse_if_open=True)
        devdb.create_tables(MODELS)
        self.secret = secret or secrets.token_hex(32)
        self.access_ttl, self.refresh_ttl = access_ttl, refresh_ttl
        self.rate_limit, self.rate_window = rate_limit, rate_window
        self.faults = Faults()
        self.lock = threading.RLock()
        self.hits: dict = defaultdict(deque)
        self.requests = 0
        self.history: deque = deque(maxlen=20000)   # (t, client, status, retry_after, path, arrived)
        for email, password in users:
            if not User.select().where(User.email == email).exists():
                User.create(email=email, password_hash=hash_password(password))

    # -- tokens ---------------------------------------------------------------------------
    def _token(self, user: User, kind: str, ttl: float) -> tuple[str, str]:
        now = time.time()
        jti = uuid.uuid4().hex
        claims = {"sub": str(user.id), "email": user.email, "role": user.role, "type": kind,
                  "iat": int(now), "exp": int(math.ceil(now + ttl)), "jti": jti}
        return jwt.encode(claims, self.secret, algorithm="HS256"), jti

    def _issue(self, user: User) -> dict:
        access, _ = self._token(user, "access", self.access_ttl)
        refresh, jti = self._token(user, "refresh", self.refresh_ttl)
        User.update(refresh_jti=jti).where(User.id == user.id).execute()
        return {"accessToken": access, "refreshToken": refresh,
                "expiresIn": int(math.ceil(self.access_ttl))}

    def _decode(self, token: str, kind: str) -> dict:
        try:
            claims = jwt.decode(token, self.secret, algorithms=["HS256"])
        except jwt.ExpiredSignatureError:
            raise HTTPError(401, "Token expired") from None
        except jwt.InvalidTokenError:
            raise HTTPError(401, "Invalid token") from None
        if claims.get("type") != kind:
            raise HTTPError(401, "Invalid token type")
        return claims

    def authenticate(self, header: str | None) -> User:
        if not header or not header.startswith("Bearer "):
            raise HTTPError(401, "Missing bearer token")
        claims = self._decode(header[7:], "access")
        user = User.get_or_none(User.id == int(claims["sub"]))
        if user is None:
            raise HTTPError(401, "Unknown user")
        return user

    # -- rate limiting ----------------------------------------------------------------------
    def check_rate(self, client: str, path: str, arrived: float | None = None) -> None:
        if not self.rate_limit:
            return
        now = time.monotonic()
        window = self.hits[(client, path)]
        while window and window[0] <= now - self.rate_window:
            window.popleft()
        if len(window) >= self.rate_limit:
            retry = max(1, math.ceil(window[0] + self.rate_window - now))
            # a 429 is dated when it is answered; (arrival, answer) lets tests drop the 429s
            # that went to a request its client had already given up on (timed out)
            self.history.append((now, client, 429, retry, path, arrived or now))
            raise HTTPError(429, "ThrottlerException: Too Many Requests",
                            headers={"Retry-After": str(retry)})
        window.append(now)
        self.history.append((arrived or now, client, 0, None, path, arrived or now))

    # -- endpoints --------------------------------------------------------------------------
    def login(self, body) -> tuple[int, dict]:
        email, password = body.get("email"), body.get("password")
        if not isinstance(email, str) or not isinstance(password, str) or not email or not password:
            raise HTTPError(400, "email and password are required strings")
        user = User.get_or_none(User.email == email)
        if user is None or not check_password(password, user.password_hash):
            raise HTTPError(401, "Invalid credentials")
        tokens = self._issue(user)
        return 200, {"accessToken": tokens["accessToken"], "refreshToken": tokens["refreshToken"],
                     "user": {"id": str(user.id), "email": user.email, "role": user.role}}

    def refresh(self, body) -> tuple[int, dict]:
        token = body.get("refreshToken")
        if not isinstance(token, str) or not token:
            raise HTTPError(400, "refreshToken is required")
        claims = self._decode(token, "refresh")
        user = User.get_or_none(User.id == int(claims["sub"]))
        if user is None or user.refresh_jti != claims.get("jti"):
            raise HTTPError(401, "Refresh token revoked")
        return 200, self._issue(user)

    def register_device(self, body) -> tuple[int, dict]:
        name, kind, serial = body.get("name"), body.get("type"), body.get("serialNumber")
        if not isinstance(name, str) or not name.strip():
            raise HTTPError(400, "name must be a non-empty string")
        if kind != "MUSHROOM_CHAMBER":
            raise HTTPError(400, "type must be MUSHROOM_CHAMBER")
        if not isinstance(serial, str) or not serial:
            raise HTTPError(400, "serialNumber must be a non-empty string")
        for opt in ("location", "firmware"):
            if opt in body and not isinstance(body[opt], str):
                raise HTTPError(400, f"{opt} must be a string")
        if Device.select().where(Device.serial_number == serial).exists():
            raise HTTPError(409, f"Device with serial number {serial} already exists")
        device = Device.create(serial_number=serial, uid=str(uuid.uuid4()), name=name, type=kind,
                               location=body.get("location"), firmware=body.get("firmware"))
        return 201, self._device_json(device)

    def _device(self, serial: str) -> Device:
        device = Device.get_or_none(Device.serial_number == serial)
        if device is None:
            raise HTTPError(404, f"Device {serial} not found")
        return device

    @staticmethod
    def _device_json(d: Device) -> dict:
        return {"id": d.uid, "name": d.name, "type": d.type, "serialNumber": d.serial_number,
                "status": d.status, "lastSeen": d.last_seen, "metadata": json.loads(d.metadata),
                "location": d.location, "firmware": d.firmware}

    def update_device(self, serial: str, body) -> tuple[int, dict]:
        device = self._device(serial)
        if "status" in body and body["status"] not in DEVICE_STATUSES:
            raise HTTPError(400, f"status must be one of {', '.join(DEVICE_STATUSES)}")
        if "lastSeen" in body and not _is_iso(body["lastSeen"]):
            raise HTTPError(400, "lastSeen must be an ISO 8601 date string")
        if "metadata" in body and not isinstance(body["metadata"], dict):
            raise HTTPError(400, "metadata must be an object")
        unknown = set(body) - {"status", "lastSeen", "metadata", "name", "location", "firmware"}
        if unknown:
            raise HTTPError(400, f"property {sorted(unknown)[0]} should not exist")
        Device.update(status=body.get("status", device.status),
                      last_seen=body.get("lastSeen", device.last_seen),
                      metadata=json.dumps(body.get("metadata", json.loads(device.metadata))),
                      updates=Device.updates + 1).where(Device.id == device.id).execute()
        return 200, self._device_json(Device.get_by_id(device.id))

    def ingest(self, body, key: str | None) -> tuple[int, dict]:
        if not key or len(key) > 200:
            raise HTTPError(400, "Idempotency-Key header is required (at most 200 characters)")
        device_id, readings = body.get("deviceId"), body.get("readings")
        if not isinstance(device_id, str) or not device_id:
            raise HTTPError(400, "deviceId must be a non-empty string")
        if not isinstance(readings, list) or not readings:
            raise HTTPError(400, "readings must be a non-empty array")
        if len(readings) > MAX_READINGS:
            raise HTTPError(413, f"at most {MAX_READINGS} readings per request")
        self._device(device_id)
        cached = IdempotentResponse.get_or_none(IdempotentResponse.key == f"{device_id}:{key}")
        if cached:
            return 201, json.loads(cached.body)
        rows = []
        for i, r in enumerate(readings):
            where = f"readings[{i}]"
            if not isinstance(r, dict):
                raise HTTPError(400, f"{where} must be an object")
            if not isinstance(r.get("id"), str) or not 0 < len(r["id"]) <= 100:
                raise HTTPError(400, f"{where}.id must be a string of 1 to 100 characters")
            if r.get("room") not in ROOMS:
                raise HTTPError(400, f"{where}.room must be one of {', '.join(ROOMS)}")
            for field in ("temperature", "humidity", "co2"):
                if not _is_number(r.get(field)):
                    raise HTTPError(400, f"{where}.{field} must be a number")
            if not _is_iso(r.get("timestamp")):
                raise HTTPError(400, f"{where}.timestamp must be an ISO 8601 date string")
            rows.append((device_id, r["id"], r["room"], r["temperature"], r["humidity"], r["co2"],
                         r["timestamp"]))
        with devdb.atomic():
            conn = devdb.connection()
            before = conn.total_changes
            # executemany on peewee's connection: building a 500-row insert through the query
            # builder costs more than the whole rest of the request.
            conn.executemany(_INSERT_READING, rows)
            accepted = conn.total_changes - before     # rows inserted; ignored ones are duplicates
            result = {"accepted": accepted, "duplicates": len(rows) - accepted}
            IdempotentResponse.create(key=f"{device_id}:{key}", body=json.dumps(result))
        return 201, result

    def list_commands(self, serial: str) -> tuple[int, dict]:
        self._device(serial)
        now = _iso_now()
        out = []
        with devdb.atomic():
            for c in DevCommand.select().where(DevCommand.device == serial).order_by(
                    DevCommand.id.desc()).limit(50):
                if c.status == "pending":
                    c.status, c.sent_at = "sent", now
                    c.save()
                item = {"id": c.command_id, "command": c.command,
                        "parameters": json.loads(c.parameters), "status": c.status,
                        "sentAt": c.sent_at}
                if c.expires_at:
                    item["expiresAt"] = c.expires_at
                out.append(item)
        return 200, {"commands": out}

    def ack_command(self, serial: str, command_id: str, body) -> tuple[int, dict]:
        self._device(serial)
        if body.get("status") not in ("completed", "failed"):
            raise HTTPError(400, "status must be completed or failed")
        if "response" in body and not isinstance(body["response"], dict):
            raise HTTPError(400, "response must be an object")
        if not _is_iso(body.get("acknowledgedAt")):
            raise HTTPError(400, "acknowledgedAt must be an ISO 8601 date string")
        cmd = DevCommand.get_or_none((DevCommand.command_id == command_id) &
                                     (DevCommand.device == serial))
        if cmd is None:
            raise HTTPError(404, f"Command {command_id} not found")
        DevCommand.update(status=body["status"], response=json.dumps(body.get("response", {})),
                          acknowledged_at=body["acknowledgedAt"],
                          acks=DevCommand.acks + 1).where(DevCommand.id == cmd.id).execute()
        return 200, {"id": command_id, "status": body["status"]}

    def trigger_alert(self, body) -> tuple[int, dict]:
        for field in ("eventType", "message", "deviceId"):
            if not isinstance(body.get(field), str) or not body[field]:
                raise HTTPError(400, f"{field} must be a non-empty string")
        if body.get("severity") not in SEVERITIES:
            raise HTTPError(400, f"severity must be one of {', '.join(SEVERITIES)}")
        if "data" in body and not isinstance(body["data"], dict):
            raise HTTPError(400, "data must be an object")
        if "triggeredAt" in body and not _is_iso(body["triggeredAt"]):
            raise HTTPError(400, "triggeredAt must be an ISO 8601 date string")
        self._device(body["deviceId"])
        alert = DevAlert.create(device=body["deviceId"], event_type=body["eventType"],
                                severity=body["severity"], message=body["message"],
                                data=json.dumps(body.get("data", {})),
                                triggered_at=body.get("triggeredAt") or _iso_now())
        return 201, {"id": str(alert.id), "eventType": alert.event_type}

    def configuration(self, serial: str) -> tuple[int, dict]:
        self._device(serial)
        row = DeviceConfiguration.get_or_none(DeviceConfiguration.device == serial)
        return 200, {"configuration": json.loads(row.body) if row else {}}

    # -- admin ------------------------------------------------------------------------------
    def admin_issue(self, serial: str, body) -> tuple[int, dict]:
        command = body.get("command")
        if not isinstance(command, str) or not command:
            raise HTTPError(400, "command must be a non-empty string")
        params = body.get("parameters", {})
        expires = None
        if body.get("expiresIn") is not None:
            expires = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=float(body["expiresIn"])))
            expires = expires.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        cmd = DevCommand.create(command_id=body.get("id") or str(uuid.uuid4()), device=serial,
                                command=command, parameters=json.dumps(params),
                                created_at=dt.datetime.now(), expires_at=expires)
        return 201, {"id": cmd.command_id, "command": command, "parameters": params,
                     "status": "pending", "expiresAt": expires}

    def admin_state(self, serial: str | None) -> tuple[int, dict]:
        q = Reading.select(Reading.device, fn.COUNT(Reading.id)).group_by(Reading.device).tuples()
        return 200, {
            "readings": dict(q),
            "reading_ids": [r.reading_id for r in Reading.select(Reading.reading_id)
                            .where(Reading.device == serial)] if serial else [],
            "devices": [self._device_json(d) for d in Device.select()],
            "commands": [{"id": c.command_id, "status": c.status, "acks": c.acks,
                          "response": json.loads(c.response) if c.response else None}
                         for c in DevCommand.select()],
            "alerts": [{"eventType": a.event_type, "severity": a.severity, "message": a.message,
                        "data": json.loads(a.data)} for a in DevAlert.select()],
            "requests": self.requests,
            "history": list(self.history),
            "faults": self.faults.as_dict(),
        }

    def admin_faults(self, body) -> tuple[int, dict]:
        f = self.faults
        if "fail_next" in body:
            f.fail_next = int(body["fail_next"])
            f.fail_after = int(body.get("fail_after", 0))
            f.fail_status = int(body.get("fail_status", 503))
        if "latency" in body:
            f.latency = float(body["latency"])
        if "drop_for" in body:
            f.drop_until = time.monotonic() + float(body["drop_for"])
        if "bare" in body:
            f.bare = bool(body["bare"])
        if "rate_limit" in body:
            self.rate_limit = int(body["rate_limit"])
            self.rate_window = float(body.get("rate_window", self.rate_window))
            self.hits.clear()
        if "access_ttl" in body:
            self.access_ttl = float(body["access_ttl"])
        if "refresh_ttl" in body:
            self.refresh_ttl = float(body["refresh_ttl"])
        if "configuration" in body:
            DeviceConfiguration.replace(device=body["device"],
                                        body=json.dumps(body["configuration"])).execute()
        return 200, f.as_dict()


_ROUTES = [
    ("POST", r"/auth/login$", "login", False),
    ("POST", r"/auth/refresh$", "refresh", False),
    ("POST", r"/devices$", "register_device", True),
    ("PUT", r"/devices/(?P<serial>[^/]+)$", "update_device", True),
    ("POST", r"/sensors/data$", "ingest", True),
    ("GET", r"/devices/(?P<serial>[^/]+)/commands$", "list_commands", True),
    ("PUT", r"/devices/(?P<serial>[^/]+)/commands/(?P<command_id>[^/]+)$", "ack_command", True),
    ("POST", r"/alerts/trigger$", "trigger_alert", True),
    ("GET", r"/devices/(?P<serial>[^/]+)/configuration$", "configuration", True),
]
PREFIX = "/api/v1"


class Handler(BaseHTTPRequestHandler):
    server_version = "mash-devserver/1"
    protocol_version = "HTTP/1.1"
    backend: Backend = None      # set by serve()

    def log_message(self, fmt, *args):
        log.debug("%s %s", self.address_string(), fmt % args)

    def _send(self, status: int, payload, headers=None, path="") -> None:
        bare = self.backend.faults.bare and not path.startswith(PREFIX + "/admin/")
        if status < 400 and not bare:
            payload = {"success": True, "statusCode": status, "data": payload,
                       "timestamp": _iso_now(), "path": path}
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        # Headers and body in one write: as two small writes on a kept-alive connection,
        # Nagle's algorithm and the client's delayed ACK add ~40 ms to every response.
        self._headers_buffer.append(b"\r\n" + body)
        self.flush_headers()

    def _error(self, err: HTTPError, path: str) -> None:
        self._send(err.status, {"success": False, "statusCode": err.status,
                                "error": {"type": err.kind, "message": err.message},
                                "timestamp": _iso_now(), "path": path}, err.headers)

    def _dispatch(self, method: str) -> None:
        b = self.backend
        arrived = time.monotonic()
        path = urlsplit(self.path).path
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self.close_connection = True
            return self._error(HTTPError(413, "body too large"), path)
        raw = self.rfile.read(length) if length else b""
        admin = path.startswith(PREFIX + "/admin/")     # the fault switches never hit admin
        if not admin and b.faults.drop_until > time.monotonic():
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if not admin and b.faults.latency:
            time.sleep(b.faults.latency)
        try:
            body = {}
            if raw:
                try:
                    body = json.loads(raw)
                except ValueError:
                    raise HTTPError(400, "Unexpected token in JSON body") from None
                if not isinstance(body, dict):
                    raise HTTPError(400, "body must be a JSON object")
            if admin:
                status, payload = self._admin(method, path[len(PREFIX + "/admin/"):], body)
                return self._send(status, payload, path=path)
            with b.lock:
                b.requests += 1
                if b.faults.fail_next > 0 and b.faults.fail_after > 0:
                    b.faults.fail_after -= 1
                elif b.faults.fail_next > 0:
                    b.faults.fail_next -= 1
                    raise HTTPError(b.faults.fail_status, "Service temporarily unavailable")
            if not path.startswith(PREFIX + "/"):
                raise HTTPError(404, f"Cannot {method} {path}")
            sub = path[len(PREFIX):]
            for m, pattern, name, needs_auth in _ROUTES:
                match = re.match(pattern, sub)
                if match and m == method:
                    client = self.client_address[0]
                    if needs_auth:
                        user = b.authenticate(self.headers.get("Authorization"))
                        client = f"user:{user.id}"
                    with b.lock:
                        b.check_rate(client, f"{method} {sub}", arrived)
                    args = match.groupdict()
                    with b.lock:
                        if name == "ingest":
                            status, payload = b.ingest(body, self.headers.get("Idempotency-Key"))
                        elif name in ("list_commands", "configuration"):
                            status, payload = getattr(b, name)(**args)
                        else:
                            status, payload = getattr(b, name)(*args.values(), body)
                    return self._send(status, payload, path=path)
            raise HTTPError(404, f"Cannot {method} {path}")
        except HTTPError as err:
            self._error(err, path)
        except Exception as exc:   # a bug here must be a 500, not a dropped connection
            log.exception("devserver error")
            self._error(HTTPError(500, f"Internal server error: {exc}", "INTERNAL"), path)

    def _admin(self, method: str, sub: str, body) -> tuple[int, dict]:
        b = self.backend
        with b.lock:
            m = re.match(r"devices/([^/]+)/commands$", sub)
            if method == "POST" and m:
                return b.admin_issue(m.group(1), body)
            if method == "GET" and sub.startswith("state"):
                device = urlsplit(self.path).query.partition("device=")[2] or None
                return b.admin_state(device)
            if method == "POST" and sub == "faults":
                return b.admin_faults(body)
        raise HTTPError(404, f"no admin route {method} {sub}")

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")


def serve(backend: Backend, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"backend": backend})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def main(args) -> int:
    setup_logging(os.environ.get("LOG_LEVEL", "INFO").upper())
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print("the reference backend listens on loopback only", flush=True)
        return 2
    users = [tuple(u.split(":", 1)) for u in args.user if ":" in u]
    if not users:
        s = Settings.load()
        if s.device_email and s.device_password:
            users = [(s.device_email, s.device_password)]
    backend = Backend(args.db, secret=args.secret, access_ttl=args.access_ttl,
                      refresh_ttl=args.refresh_ttl, rate_limit=args.rate_limit,
                      rate_window=args.rate_window, users=users)
    server = serve(backend, args.host, args.port)
    host, port = server.server_address[:2]
    print(f"mash devserver listening on http://{host}:{port}{PREFIX} "
          f"(accounts: {', '.join(u for u, _ in users) or 'none'})", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def issue_command(url: str, device: str, command: str, parameters: dict,
                  expires_in: float | None = None) -> dict:
    """Queue a command for ``device`` on a running reference backend (the admin endpoint)."""
    base = url.rstrip("/")
    base = base if base.endswith(PREFIX) else base + PREFIX
    body = {"command": command, "parameters": parameters}
    if expires_in is not None:
        body["expiresIn"] = expires_in
    r = requests.post(f"{base}/admin/devices/{device}/commands", json=body, timeout=10)
    r.raise_for_status()
    data = r.json()
    return data.get("data", data)
