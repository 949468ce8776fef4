"""Remote and local commands (CONTRACT.md §3 "Commands", §7): validation, pure logic.

Every channel (backend poll, MQTT, the dashboard, the climate controller) hands a command
to ``validate`` before it goes in the ledger; the ledger's unique id makes execution at most
once per id. No I/O here: the worker's intake (``mash.tasks.intake``) and the dashboard do
the writing.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from urllib.parse import urlsplit

from mash import protocol
from mash.clock import parse_iso, utcnow
from mash.config import is_loopback
from mash.contract import ROOM_MODES, ROOMS
from mash.rules import (DEFAULT_CONTROL, ConfigError, merge_control, merge_thresholds,
                        overlay_control)
from mash.contract import (APPS_ACTUATORS, COMMANDS, MASH_COMMANDS, MAX_COMMAND_BYTES,
                           MAX_COMMAND_ID, MAX_PARSE_BYTES, UPDATE_PARAMETERS)

INTERVAL_SETTINGS = ("sync_interval", "command_poll_interval", "heartbeat_interval")
CONFIGURABLE = ("thresholds", "mode", "control") + INTERVAL_SETTINGS

# The id of a payload too large to parse whole: the first "id" string in it.
_ID_RE = re.compile(rb'"id"\s*:\s*"((?:[^"\\]|\\.){1,%d})"' % MAX_COMMAND_ID)


class Rejected(Exception):
    """A command with a usable id that is acknowledged ``failed`` with this reason."""


def usable_id(value) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_COMMAND_ID


def parse_payload(raw: bytes) -> tuple[dict | None, str | None, str]:
    """An MQTT payload as ``(command, None, "")``, or ``(None, bad_kind, detail)`` when it
    has no usable object. A payload over MAX_PARSE_BYTES is not parsed whole: its id is read
    from the bytes, so it can still be acknowledged ``failed`` (oversize)."""
    size = len(raw)
    if size > MAX_PARSE_BYTES:
        m = _ID_RE.search(raw)
        if m:
            try:
                found = json.loads(b'"' + m.group(1) + b'"')
            except ValueError:
                found = None
            if usable_id(found):
                return {"id": found}, None, ""
        return None, "too_large", f"{size} bytes, no readable id"
    try:
        cmd = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return None, "bad_json", str(exc)[:80]
    except RecursionError:
        return None, "bad_json", "nested too deep"
    if not isinstance(cmd, dict):
        return None, "not_object", type(cmd).__name__
    return cmd, None, ""


def validate(cmd: dict, device_id: str | tuple[str, ...], size: int,
             now: dt.datetime | None | str = "system") -> tuple[str, dict, object]:
    """``(command, parameters, expires_at)`` of a command object, or raise Rejected.

    ``device_id``: the names this device answers to (the serial, and under the deployed MASH
    backend its own id for the device). The backend's command names are mapped onto ours
    (``from_mash``).

    ``now``: the true time (naive UTC) that expiry is judged by; the default is this
    machine's clock, None means nobody knows it (a command with ``expiresAt`` is then
    refused: running a stale one is worse than asking again)."""
    if size > MAX_COMMAND_BYTES:
        raise Rejected(f"oversize: {size} bytes (at most {MAX_COMMAND_BYTES})")
    names = (device_id,) if isinstance(device_id, str) else tuple(device_id)
    target = cmd.get("deviceId")
    if target is not None and target not in names:
        raise Rejected(f"addressed to device {str(target)[:64]!r}, not {names[0]}")
    command = cmd.get("command")
    params = cmd.get("parameters", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise Rejected("malformed: parameters must be an object")
    if isinstance(command, str) and command in MASH_COMMANDS and command not in COMMANDS:
        command, params = from_mash(command, params)
    if not isinstance(command, str) or command not in COMMANDS:
        raise Rejected(f"unknown command {str(command)[:64]!r} (known: {', '.join(COMMANDS)})")
    expires = None
    if cmd.get("expiresAt") is not None:
        expires = parse_iso(cmd["expiresAt"])
        if expires is None:
            raise Rejected("malformed: expiresAt is not an ISO 8601 date")
        if now is None:
            raise Rejected("cannot judge expiresAt: this gateway's clock is not synchronized "
                           "and the backend's time is not known yet")
        if expires <= (utcnow() if now == "system" else now):
            raise Rejected(f"expired at {cmd['expiresAt']}")
    if command == "set_actuator":
        try:
            line = protocol.encode_command(params.get("actuator"), params.get("state"))
        except ValueError as exc:
            raise Rejected(f"malformed: {exc}") from None
        params = json.loads(line)            # normalised: upper-case, only the two keys
    elif command == "CONFIGURE":
        validate_configuration(params)
    elif command == "update":
        params = validate_update(params)
    elif command == "RESTART":
        params = {}
    return command, params, expires


def from_mash(command: str, params: dict) -> tuple[str, dict]:
    """The deployed MASH backend's command (CONTRACT §9) as ours, or Rejected:

    - ``START``/``STOP`` ``{"actuator"}``: that relay ON/OFF. The actuator is a firmware name
      (``MIST_MAKER``, any case) or the apps' name with ``room`` (``{"actuator":"mist_maker",
      "room":"fruiting"}``); other parameters are ignored.
    - ``UPDATE_FIRMWARE {version, url, checksum}``: ``update`` (the checksum is the sha256).
    - ``RESET``, ``CALIBRATE``: not supported by this gateway (acknowledged failed).
    (``RESTART``, ``CONFIGURE`` and ``REQUEST_STATUS`` are ours already.)"""
    if command in ("START", "STOP"):
        name = params.get("actuator")
        if not isinstance(name, str) or not name:
            raise Rejected(f"malformed: {command} needs parameters.actuator")
        actuator = name.upper()
        if (params.get("room"), name.lower()) in APPS_ACTUATORS:
            actuator = APPS_ACTUATORS[(params["room"], name.lower())]
        return "set_actuator", {"actuator": actuator, "state": "ON" if command == "START" else "OFF"}
    if command == "UPDATE_FIRMWARE":
        unknown = set(params) - {"version", "url", "checksum"}
        if unknown:
            raise Rejected(f"malformed: unknown parameter {sorted(unknown)[0]!r} "
                           "(parameters: version, url, checksum)")
        return "update", {"version": params.get("version"), "url": params.get("url"),
                          "sha256": params.get("checksum")}
    raise Rejected(f"not supported: {command} has no meaning on this gateway yet")


def mash_mqtt_command(kind: str, topic: str, raw: bytes) -> tuple[dict | None, str | None, str]:
    """A message on one of the deployed MASH backend's device topics (CONTRACT §9) as a
    command, like ``parse_payload``: ``kind`` ``command`` (``{"command","parameters",
    "timestamp"}``), ``config`` (``{"configuration"}``: a CONFIGURE) or ``request_status``.
    They carry no id, so the id is derived from the topic and the exact bytes: a redelivery
    is the same command (the ledger runs it once); the backend stamps each new one with its
    time, so two real ones differ."""
    cmd, bad, detail = parse_payload(raw)
    if cmd is None:
        return None, bad, detail
    command_id = "mq-" + hashlib.sha256(topic.encode() + b"\0" + raw).hexdigest()[:32]
    if kind == "config":
        return {"id": command_id, "command": "CONFIGURE",
                "parameters": cmd.get("configuration")}, None, ""
    if kind == "request_status":
        return {"id": command_id, "command": "REQUEST_STATUS"}, None, ""
    return {"id": command_id, "command": cmd.get("command"),
            "parameters": cmd.get("parameters")}, None, ""


_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_VERSION_RE = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+!_-]{0,63}")


def validate_update(params: dict) -> dict:
    """An ``update`` command's ``{"version", "url", "sha256"}``, normalised, or Rejected: the
    wheel's URL over https (plain http only to a loopback host), its sha256 as 64 hex digits
    (the updater checks the download against it before anything runs)."""
    unknown = set(params) - set(UPDATE_PARAMETERS)
    if unknown:
        raise Rejected(f"malformed: unknown parameter {sorted(unknown)[0]!r} "
                       f"(parameters: {', '.join(UPDATE_PARAMETERS)})")
    version, url, sha = params.get("version"), params.get("url"), params.get("sha256")
    if not isinstance(version, str) or not _VERSION_RE.fullmatch(version):
        raise Rejected("malformed: version must be a version string like 0.2.0")
    if not isinstance(url, str) or len(url) > 2048:
        raise Rejected("malformed: url must be the wheel's (or a release manifest's) URL")
    parts = urlsplit(url)
    if not (parts.scheme == "https" and parts.hostname) and not (
            parts.scheme == "http" and parts.hostname and is_loopback(parts.hostname)):
        raise Rejected("malformed: url must be https:// (plain http only on a loopback host)")
    if not isinstance(sha, str) or not _SHA256_RE.fullmatch(sha.lower()):
        raise Rejected("malformed: sha256 must be 64 hex digits")
    return {"version": version, "url": url, "sha256": sha.lower()}


def validate_configuration(params: dict) -> None:
    """Raise Rejected unless ``params`` is a well-formed CONFIGURE body. Whether it can run
    with the limits in force is ``configure``'s question: every path that stores one asks it."""
    unknown = set(params) - set(CONFIGURABLE)
    if unknown:
        raise Rejected(f"malformed: unknown setting {sorted(unknown)[0]!r} "
                       f"(settings: {', '.join(CONFIGURABLE)})")
    if "thresholds" in params:
        try:
            merge_thresholds({}, params["thresholds"] if isinstance(params["thresholds"], dict)
                             else None, "thresholds")
        except ConfigError as exc:
            raise Rejected(f"malformed: {exc.why}") from None
    if "control" in params:
        try:
            overlay_control(DEFAULT_CONTROL, params["control"], "control")
        except ConfigError as exc:
            raise Rejected(f"malformed: control: {exc.why}") from None
    if "mode" in params:
        modes = params["mode"]
        if not isinstance(modes, dict) or not all(
                room in ROOMS and m in ROOM_MODES for room, m in modes.items()):
            raise Rejected(f"malformed: mode must be an object of rooms ({', '.join(ROOMS)}) "
                           f"set to {' or '.join(ROOM_MODES)}")
    for key in INTERVAL_SETTINGS:
        value = params.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not 1 <= value <= 86400):
            raise Rejected(f"malformed: {key} must be a whole number of seconds, 1 to 86400")


def limits_in_force(settings, configured: dict | None) -> tuple[dict, dict]:
    """``(alert thresholds, control rules)`` the gateway runs with: ``settings``
    (ALERT_THRESHOLDS, CONTROL_RULES over the defaults), then the stored configuration
    (``meta.configuration``) over them. Raises ConfigError (key ``CONFIGURE``) when the stored
    configuration cannot run with those settings."""
    configured = configured or {}
    thresholds = settings.thresholds
    if configured.get("thresholds"):
        thresholds = merge_thresholds(settings.thresholds, configured["thresholds"], "CONFIGURE")
    control = merge_control(DEFAULT_CONTROL, settings.control_rules)
    if configured.get("control"):
        control = merge_control(control, configured["control"], "CONFIGURE")
    return thresholds, control


def configure(settings, configured: dict | None, params: dict) -> dict:
    """The configuration to store after the CONFIGURE ``params``, given the one stored now:
    raises Rejected (the reason for the ack) unless ``params`` is well formed and the result
    runs with the limits in force (``limits_in_force``). The one check for every path that
    stores a configuration: the command, the dashboard and a pulled one."""
    validate_configuration(params)
    merged = merge_configuration(configured or {}, params)
    try:
        limits_in_force(settings, merged)
    except ConfigError as exc:
        raise Rejected(f"conflicts with the limits in force: {exc.why}") from None
    return merged


def merge_configuration(current: dict, params: dict) -> dict:
    """The stored configuration after a CONFIGURE: thresholds merged per room and limit,
    other settings replaced."""
    merged = dict(current or {})
    for per_room in ("thresholds", "control"):
        if per_room in params:
            rooms = {k: dict(v) if isinstance(v, dict) else v
                     for k, v in merged.get(per_room, {}).items()}
            for room, values in params[per_room].items():
                rooms[room] = ({**rooms.get(room, {}), **values} if isinstance(values, dict)
                               else values)
            merged[per_room] = rooms
    if "mode" in params:
        merged["mode"] = {**merged.get("mode", {}), **params["mode"]}
    merged.update({k: v for k, v in params.items() if k not in ("thresholds", "control", "mode")})
    return merged
