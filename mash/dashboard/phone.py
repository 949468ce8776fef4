"""The MASH grower app's local API (CONTRACT §10): what the app calls on ``http://<ip>:5000/api``,
served by the dashboard process beside the dashboard, on ``PHONE_API_HOST:PHONE_API_PORT``.

Every answer is ``{"success": true, "data": ...}`` (an error ``{"success": false, "error":
...}``), shaped exactly as the app's Dart code reads it. The app's names are the older
gateway's, mapped onto our relays (``APP_RELAYS``): ``humidifier`` is the mist cycle
(MIST_MAKER with HUMIDIFIER_FAN), ``blower_fan`` the fruiting intake fan, ``exhaust_fan`` the
exhaust of the room in ``mode`` (``f`` fruiting, ``s`` spawning: which room the app is
shown), ``led_lights`` the fruiting LED. Every answer is computed from the store, like the
dashboard's.

The app sends no credentials, so (``PHONE_API``):

- ``read`` (default): status, readings, relay states, logs, statistics; every write is 403;
- ``control``: also the relay, mode and automation routes, but only from this machine or a
  client inside one of its own private subnets, with no ``Origin`` header (a web page in a
  browser on the LAN sends one; the app never does) and no proxy header, at most
  ``WRITES_PER_MINUTE`` per client (429 past it). Every write goes the dashboard's way
  (``actions``): a relay is a ``set_actuator`` in the command ledger, source ``local``, with
  the same validation, the mist's 60 s cap and the override (the reader applies both to any
  command); mode and automation are a ``CONFIGURE`` recorded in the ledger;
- ``off``: not served at all.

Nothing that reboots, updates, or reveals a setting or a secret is on this API, at any level.
A ``Host`` that is not this machine's name or an address is refused (DNS rebinding).
"""
from __future__ import annotations

import datetime as dt
import json
import logging

from flask import Flask, jsonify, request

from mash.clock import iso, utcnow
from mash.config import Settings
from mash.contract import ROOMS
from mash.control import effective_modes
from mash.dashboard import actions, auth, data, lan
from mash.models import Store

log = logging.getLogger("mash.phone")

MODE_KEY = "phone.mode"                    # meta: the room the app shows, "f" or "s"
ROOM_OF_MODE = {"f": "fruiting", "s": "spawning"}
MODE_OF_ROOM = {room: mode for mode, room in ROOM_OF_MODE.items()}
APP_NAMES = ("exhaust_fan", "humidifier", "blower_fan", "led_lights")
WRITES_PER_MINUTE = 20
MAX_HOURS = 24 * 31
MAX_LIMIT = 1000


def relays_of(name: str, mode: str) -> tuple[str, ...]:
    """Our relays behind one of the app's names, for the room in ``mode``."""
    if name == "humidifier":
        return ("MIST_MAKER", "HUMIDIFIER_FAN")
    if name == "blower_fan":
        return ("FRUITING_INTAKE_FAN",)
    if name == "led_lights":
        return ("FRUITING_LED",)
    if name == "exhaust_fan":
        return ("FRUITING_EXHAUST_FAN",) if mode == "f" else ("SPAWNING_EXHAUST_FAN",)
    raise KeyError(name)


def app_states(states: dict[str, str], mode: str) -> dict[str, bool]:
    """``{app name: on?}`` from ``{relay: ON|OFF}``: on when any of its relays is ON (the mist
    cycle is running while either of its relays is)."""
    return {name: any(states.get(r) == "ON" for r in relays_of(name, mode)) for name in APP_NAMES}


class WriteLimiter(auth.LoginLimiter):
    """The login limiter's window, counting every write: WRITES_PER_MINUTE per client."""
    LIMIT, WINDOW, DELAY = WRITES_PER_MINUTE, 60.0, 0.0


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def ok(payload=None):
    return jsonify({"success": True, "data": payload if payload is not None else {}})


def create_app(settings: Settings, store: Store, reads: Store, interfaces=None) -> Flask:
    """The app over ``store`` (writes, through ``actions``) and ``reads`` (read-only).
    ``interfaces``: this machine's interface addresses (default: read at each write)."""
    app = Flask(__name__)
    app.config.update(JSON_SORT_KEYS=False)
    level = settings.phone_api
    names = auth.own_names(settings.phone_api_host) | {lan.host_name(settings.device_id)}
    limiter = WriteLimiter()

    def mode() -> str:
        m = store.meta_get(MODE_KEY)
        return m if m in ROOM_OF_MODE else "f"

    def states() -> dict[str, str]:
        return {a: s["state"] for a, s in reads.actuator_states().items()}

    def number(key: str, default: int, lo: int, hi: int) -> int:
        raw = request.args.get(key)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            raise Refused(400, f"{key} must be a whole number") from None
        if not lo <= value <= hi:
            raise Refused(400, f"{key} must be between {lo} and {hi}")
        return value

    def body() -> dict:
        payload = request.get_json(silent=True, force=True)
        return payload if isinstance(payload, dict) else {}

    @app.errorhandler(Refused)
    def refused(exc: Refused):
        return jsonify({"success": False, "error": str(exc)}), exc.status

    @app.errorhandler(actions.ActionError)
    def bad_input(exc):
        return jsonify({"success": False, "error": str(exc)}), 400

    @app.errorhandler(404)
    def not_found(_):
        return jsonify({"success": False, "error": "no such route on this gateway"}), 404

    @app.errorhandler(405)
    def wrong_method(_):
        return jsonify({"success": False, "error": "method not allowed"}), 405

    @app.before_request
    def door():
        if not auth.known_host(auth.host_name(request.headers.get("Host")), names):
            raise Refused(403, "this gateway answers to its own names and addresses only")
        if request.method == "POST":
            guard_write()

    def guard_write() -> None:
        client = request.remote_addr or "?"
        if level != "control":
            raise Refused(403, "this gateway takes no commands from the app (PHONE_API=read); "
                               "set PHONE_API=control on the gateway to allow them")
        if "Origin" in request.headers or any(h in request.headers for h in auth.PROXY_HEADERS):
            raise Refused(403, "commands are taken from the app only, not from a web page or "
                               "through a proxy")
        if not lan.on_own_private_subnet(request.remote_addr, interfaces):
            log.warning("phone API: refused a command from %s (not on this gateway's own "
                        "private subnets)", client)
            raise Refused(403, "commands are taken only from this gateway's own private "
                               "network")
        wait = limiter.wait_for(client)
        if wait > 0:
            raise Refused(429, f"too many commands: try again in {wait:.0f} s")
        limiter.failed(client)                    # counts this write

    @app.after_request
    def headers(resp):
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Cache-Control"] = "no-store"
        return resp

    # -- reads ---------------------------------------------------------------------------------
    @app.get("/api/status")
    def status():
        procs = reads.processes()
        reader = procs.get("reader") or {}
        board = reader.get("board") or {}
        return ok({"deviceId": settings.device_id, "deviceName": settings.device_name,
                   "type": "rpi-gateway", "api_version": "v1", "mode": mode(),
                   "access": level, "reader_alive": bool(reader.get("alive")),
                   "board_connected": bool(reader.get("alive") and board.get("connected")),
                   "timestamp": iso(utcnow())})

    @app.get("/api/sensor/current")
    def sensor_current():
        m = mode()
        now = utcnow()
        room = ROOM_OF_MODE[m]
        latest = data.latest(reads, now)[room]
        if latest is None:
            raise Refused(503, f"no reading from the {room} room yet")
        return ok({"temperature": latest["temperature"], "humidity": latest["humidity"],
                   "co2": latest["co2"], "mode": m, "actuators": app_states(states(), m),
                   "timestamp": latest["timestamp"], "room": room, "age_s": latest["age_s"]})

    @app.get("/api/actuators")
    def actuators():
        return ok(app_states(states(), mode()))

    @app.get("/api/automation/status")
    def automation_status():
        modes = room_modes()
        return ok({"enabled": all(v == "auto" for v in modes.values()), "modes": modes,
                   "control_mode": settings.control_mode})

    @app.get("/api/automation/history")
    def automation_history():
        return ok({"history": decisions(reads, None, number("limit", 10, 1, MAX_LIMIT))})

    @app.get("/api/logs/ai-decisions")          # the app's analytics screen calls this too
    def ai_decisions():
        since = utcnow() - dt.timedelta(hours=number("hours", 24, 1, MAX_HOURS))
        return ok({"decisions": decisions(reads, since, number("limit", 100, 1, MAX_LIMIT))})

    @app.get("/api/logs/sensors")
    def sensor_logs():
        since = utcnow() - dt.timedelta(hours=number("hours", 24, 1, MAX_HOURS))
        return ok({"readings": readings(reads, since, number("limit", 100, 1, MAX_LIMIT))})

    @app.get("/api/logs/actuators")
    def actuator_logs():
        since = utcnow() - dt.timedelta(hours=number("hours", 24, 1, MAX_HOURS))
        return ok({"history": relay_history(reads, since, number("limit", 100, 1, MAX_LIMIT),
                                            mode())})

    @app.get("/api/logs/statistics")
    def statistics():
        since = utcnow() - dt.timedelta(hours=number("hours", 24, 1, MAX_HOURS))
        return ok(stats(reads, since, mode()))

    def room_modes() -> dict[str, str]:
        return effective_modes(settings.control_mode,
                               (reads.meta_get("configuration") or {}).get("mode"))

    # -- writes (PHONE_API=control, guarded by ``door``) -------------------------------------
    @app.post("/api/mode")
    def set_mode():
        m = body().get("mode")
        if m not in ROOM_OF_MODE:
            raise Refused(400, 'mode must be "f" (fruiting) or "s" (spawning)')
        store.meta_set(MODE_KEY, m)
        log.info("phone API: the app shows the %s room", ROOM_OF_MODE[m])
        return ok({"mode": m})

    @app.post("/api/actuator")
    def set_actuator():
        b = body()
        name, state = b.get("actuator"), b.get("state")
        if name not in APP_NAMES:
            raise Refused(400, f"actuator must be one of {', '.join(APP_NAMES)}")
        if not isinstance(state, bool):
            raise Refused(400, "state must be true or false")
        ids = [actions.switch(store, relay, "ON" if state else "OFF")
               for relay in relays_of(name, mode())]
        log.info("phone API: %s %s from %s (%s)", name, "on" if state else "off",
                 request.remote_addr, ", ".join(ids))
        return ok({"actuator": name, "state": state, "commands": ids, "status": "queued"})

    @app.post("/api/automation/enable")
    def enable():
        return automation("auto")

    @app.post("/api/automation/disable")
    def disable():
        return automation("manual")

    def automation(room_mode: str):
        if settings.control_mode != "auto":
            raise Refused(409, f"CONTROL_MODE={settings.control_mode} on the gateway: climate "
                               "control cannot be switched from the app")
        command_id, _ = actions.configure(settings, store,
                                          {"mode": {room: room_mode for room in ROOMS}})
        log.info("phone API: climate control %s (%s)", room_mode, command_id)
        return ok({"enabled": room_mode == "auto", "command": command_id})

    return app


# -- what the log routes read ---------------------------------------------------------------
def readings(store: Store, since: dt.datetime, limit: int) -> list[dict]:
    """Both rooms' readings since ``since``, newest first (``mode`` says whose)."""
    first = data.first_id_since(store, since)
    if first is None:
        return []
    S = store.m.SensorData
    rows = (S.select(S.room, S.temperature, S.humidity, S.co2, S.timestamp)
            .where(S.id >= first).order_by(S.id.desc()).limit(limit))
    return [{"timestamp": iso(r.timestamp), "mode": MODE_OF_ROOM.get(r.room, r.room),
             "co2": r.co2, "temperature": r.temperature, "humidity": r.humidity} for r in rows]


def _relay_commands(store: Store):
    C = store.m.Command
    return C.select().where((C.command == "set_actuator") & (C.status == "completed"))


def relay_history(store: Store, since: dt.datetime, limit: int, mode: str) -> list[dict]:
    """The four app relays after each completed switch since ``since``, newest first, 0/1.
    Replayed forward from each relay's state before the window (its last switch before it;
    OFF when none is kept: the board starts with every relay off)."""
    C = store.m.Command
    state: dict[str, str] = {}
    for relay in {r for name in APP_NAMES for r in relays_of(name, mode)}:
        before = (_relay_commands(store).where((C.finished_at < since) & (
            C.parameters.contains(f'"{relay}"'))).order_by(C.finished_at.desc()).limit(1).first())
        state[relay] = json.loads(before.parameters).get("state", "OFF") if before else "OFF"
    out = []
    for c in _relay_commands(store).where(C.finished_at >= since).order_by(C.finished_at, C.seq):
        params = json.loads(c.parameters or "{}")
        if params.get("actuator") not in state:
            continue
        state[params["actuator"]] = params.get("state", "OFF")
        out.append({"timestamp": iso(c.finished_at),
                    "triggered_by": "ai" if c.source == "auto" else "manual", "source": c.source,
                    **{k: int(v) for k, v in app_states(state, mode).items()}})
    return out[::-1][:limit]


def decisions(store: Store, since: dt.datetime | None, limit: int) -> list[dict]:
    """The climate controller's switches (ledger source ``auto``), newest first, each with
    the reading of its room it was decided on (the last one stored before it). The ledger
    keeps no reasoning for them, so ``reasoning`` is empty."""
    C, S = store.m.Command, store.m.SensorData
    query = C.select().where((C.source == "auto") & (C.command == "set_actuator"))
    if since is not None:
        query = query.where(C.received_at >= since)
    out = []
    for c in query.order_by(C.seq.desc()).limit(limit):
        params = json.loads(c.parameters or "{}")
        relay = params.get("actuator", "")
        room = "spawning" if relay.startswith("SPAWNING") else "fruiting"
        upto = data.first_id_since(store, c.received_at)
        q = S.select(S.temperature, S.humidity, S.co2, S.timestamp).where(S.room == room)
        if upto is not None:
            q = q.where(S.id < upto)
        row = q.order_by(S.id.desc()).limit(1).first()
        out.append({"timestamp": iso(c.received_at), "mode": room,
                    "actions": {relay.lower(): params.get("state") == "ON"},
                    "reasoning": [],
                    "sensor_data": ({"temperature": row.temperature, "humidity": row.humidity,
                                     "co2": row.co2, "timestamp": iso(row.timestamp)}
                                    if row else {}),
                    "status": c.status})
    return out


def stats(store: Store, since: dt.datetime, mode: str) -> dict:
    """Averages (with min and max) of the room in ``mode`` since ``since``, how often each app
    relay was switched on, and how many switches climate control made."""
    room = ROOM_OF_MODE[mode]
    first = data.first_id_since(store, since)
    sensor = {k: {"avg": None, "min": None, "max": None} for k in ("co2", "temperature", "humidity")}
    count = 0
    if first is not None:
        row = store.db.execute_sql(
            "SELECT COUNT(*), AVG(co2), MIN(co2), MAX(co2), AVG(temperature), MIN(temperature),"
            " MAX(temperature), AVG(humidity), MIN(humidity), MAX(humidity) FROM sensor_data"
            " WHERE id >= ? AND room = ?", (first, room)).fetchone()
        count = row[0]
        if count:
            for i, k in enumerate(("co2", "temperature", "humidity")):
                sensor[k] = {"avg": round(row[1 + 3 * i], 2), "min": row[2 + 3 * i],
                             "max": row[3 + 3 * i]}
    C = store.m.Command
    usage = {name: 0 for name in APP_NAMES}
    relays = {r: name for name in APP_NAMES for r in relays_of(name, mode)}
    for c in _relay_commands(store).where(C.finished_at >= since):
        params = json.loads(c.parameters or "{}")
        if params.get("state") == "ON" and params.get("actuator") in relays:
            usage[relays[params["actuator"]]] += 1
    auto = C.select().where((C.source == "auto") & (C.command == "set_actuator")
                            & (C.received_at >= since)).count()
    return {"sensor_readings": {**sensor, "count": count}, "actuator_usage": usage,
            "ai_decisions_count": auto, "room": room, "hours_from": iso(since)}
