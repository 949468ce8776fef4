"""The reference backend's endpoints as plain methods: validation, tokens, rate limit,
faults (no HTTP here)."""
from __future__ import annotations

import datetime as dt
import json
import math
import os
import secrets
import threading
import time
import uuid
from collections import defaultdict, deque

import jwt
from peewee import fn

from mash.contract import DEVICE_STATUSES, ROOMS, SEVERITIES
from mash.devserver.schema import (_INSERT_READING, MAX_READINGS, MODELS, DevAlert, DevCommand,
                                   Device, DeviceConfiguration, IdempotentResponse, Reading,
                                   User, _is_iso, _is_number, _iso_now, check_password, devdb,
                                   hash_password)


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
        self.fail_path = ""          # fail_next only for paths containing this ("": any)
        self.latency = 0.0
        self.drop_until = 0.0
        self.bare = False            # answer bodies without the envelope
        # 401 to every request (login and refresh included) for unauthorized_for seconds,
        # counted from the first request it refuses, after letting unauthorized_after through
        self.unauthorized_for = 0.0
        self.unauthorized_after = 0
        self.unauthorized_until = 0.0
        self.unauthorized: deque = deque(maxlen=1000)     # "METHOD path" of each refused request
        # readings refused with a 400 (the whole request, naming the reading): by id, or any
        # of temperature/humidity/co2 equal to refuse_value
        self.refuse_ids: set[str] = set()
        self.refuse_value: float | None = None
        self.max_readings = MAX_READINGS     # 413 above this many readings per request

    def refuses_auth(self, what: str) -> bool:
        """Is this request answered 401 by the switch? (called once per request)"""
        now = time.monotonic()
        if self.unauthorized_for > 0 and not self.unauthorized_until:
            if self.unauthorized_after > 0:
                self.unauthorized_after -= 1
                return False
            self.unauthorized_until = now + self.unauthorized_for
        if self.unauthorized_until > now:
            self.unauthorized.append(what)
            return True
        if self.unauthorized_until:
            self.unauthorized_for, self.unauthorized_until = 0.0, 0.0
        return False

    def refused_reading(self, reading: dict) -> bool:
        return reading.get("id") in self.refuse_ids or (
            self.refuse_value is not None and self.refuse_value in
            (reading.get("temperature"), reading.get("humidity"), reading.get("co2")))

    def as_dict(self):
        now = time.monotonic()
        return {"fail_next": self.fail_next, "fail_after": self.fail_after,
                "fail_status": self.fail_status, "fail_path": self.fail_path,
                "latency": self.latency, "drop_for": max(0.0, self.drop_until - now),
                "bare": self.bare,
                "unauthorized_for": (max(0.0, self.unauthorized_until - now)
                                     if self.unauthorized_until else self.unauthorized_for),
                "unauthorized": list(self.unauthorized),
                "refuse_ids": sorted(self.refuse_ids), "refuse_value": self.refuse_value,
                "max_readings": self.max_readings}


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
        self.foreign_acks: deque = deque(maxlen=1000)
        self.history: deque = deque(maxlen=20000)   # (t, client, status, retry_after, path, arrived)
        self.uploads: deque = deque(maxlen=1000)    # (readings, status) of each POST /sensors/data
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
        readings = body.get("readings")
        try:
            status, payload = self._ingest(body, key)
        except HTTPError as err:
            self.uploads.append((len(readings) if isinstance(readings, list) else 0, err.status))
            raise
        self.uploads.append((len(readings), status))
        return status, payload

    def _ingest(self, body, key: str | None) -> tuple[int, dict]:
        if not key or len(key) > 200:
            raise HTTPError(400, "Idempotency-Key header is required (at most 200 characters)")
        device_id, readings = body.get("deviceId"), body.get("readings")
        if not isinstance(device_id, str) or not device_id:
            raise HTTPError(400, "deviceId must be a non-empty string")
        if not isinstance(readings, list) or not readings:
            raise HTTPError(400, "readings must be a non-empty array")
        if len(readings) > self.faults.max_readings:
            raise HTTPError(413, f"at most {self.faults.max_readings} readings per request")
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
            if self.faults.refused_reading(r):
                raise HTTPError(400, f"{where} (id {r['id']}) refused: value not plausible")
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
            # an outcome of a command this backend never issued (the gateway's own, from its
            # dashboard or its climate control): answered 404 as the real backend does, and
            # kept so a test can see it arrived
            self.foreign_acks.append({"id": command_id, "status": body["status"],
                                      "response": body.get("response")})
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
            "reading_times": [r.timestamp for r in Reading.select(Reading.timestamp)
                              .where(Reading.device == serial)] if serial else [],
            "devices": [self._device_json(d) for d in Device.select()],
            "commands": [{"id": c.command_id, "status": c.status, "acks": c.acks,
                          "response": json.loads(c.response) if c.response else None}
                         for c in DevCommand.select()],
            "alerts": [{"eventType": a.event_type, "severity": a.severity, "message": a.message,
                        "data": json.loads(a.data)} for a in DevAlert.select()],
            "requests": self.requests,
            "history": list(self.history),
            "foreign_acks": list(self.foreign_acks),
            "uploads": list(self.uploads),
            "faults": self.faults.as_dict(),
        }

    def admin_faults(self, body) -> tuple[int, dict]:
        f = self.faults
        if "fail_next" in body:
            f.fail_next = int(body["fail_next"])
            f.fail_after = int(body.get("fail_after", 0))
            f.fail_status = int(body.get("fail_status", 503))
            f.fail_path = str(body.get("fail_path", ""))
        if "unauthorized_for" in body:
            f.unauthorized_for = float(body["unauthorized_for"])
            f.unauthorized_after = int(body.get("unauthorized_after", 0))
            f.unauthorized_until = 0.0
            f.unauthorized.clear()
        if "refuse_ids" in body:
            f.refuse_ids = {str(i) for i in body["refuse_ids"]}
        if "refuse_value" in body:
            f.refuse_value = None if body["refuse_value"] is None else float(body["refuse_value"])
        if "max_readings" in body:
            f.max_readings = int(body["max_readings"])
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


