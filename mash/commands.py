"""Remote commands (CONTRACT.md section 3, "Commands"): validation and the ledger intake.

Both channels (the backend poll and MQTT) hand every command to ``intake``. A command id is
put in the ledger at most once, so whichever channel brings it first wins and any repeat is
dropped. ``set_actuator`` waits in the ledger for the reader (the only writer to the serial
port); the others are handled here, in the worker.
"""
from __future__ import annotations

import json
import logging

from mash import protocol
from mash.config import ConfigError, merge_thresholds
from mash.logs import OncePerKind
from mash.models import parse_iso, utcnow

log = logging.getLogger("mash.commands")

MAX_COMMAND_BYTES = 4096
MAX_PARSE_BYTES = 256 * 1024
MAX_ID = 100
KNOWN = ("set_actuator", "REQUEST_STATUS", "force_sync", "CONFIGURE")
CONFIGURABLE = ("thresholds", "sync_interval", "command_poll_interval", "heartbeat_interval")

_rejected_log = OncePerKind(log, "rejected a command")


class Rejected(Exception):
    """A command with a usable id that is acknowledged ``failed`` with this reason."""


def _validate(cmd: dict, device_id: str, size: int) -> tuple[str, dict, object]:
    """(command, parameters, expires_at) or raise Rejected(reason)."""
    if size > MAX_COMMAND_BYTES:
        raise Rejected(f"oversize: {size} bytes (at most {MAX_COMMAND_BYTES})")
    target = cmd.get("deviceId")
    if target is not None and target != device_id:
        raise Rejected(f"addressed to device {str(target)[:64]!r}, not {device_id}")
    command = cmd.get("command")
    if not isinstance(command, str) or command not in KNOWN:
        raise Rejected(f"unknown command {str(command)[:64]!r} (known: {', '.join(KNOWN)})")
    params = cmd.get("parameters", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise Rejected("malformed: parameters must be an object")
    expires = None
    if cmd.get("expiresAt") is not None:
        expires = parse_iso(cmd["expiresAt"])
        if expires is None:
            raise Rejected("malformed: expiresAt is not an ISO 8601 date")
        if expires <= utcnow():
            raise Rejected(f"expired at {cmd['expiresAt']}")
    if command == "set_actuator":
        try:
            line = protocol.encode_command(params.get("actuator"), params.get("state"))
        except ValueError as exc:
            raise Rejected(f"malformed: {exc}") from None
        params = json.loads(line)            # normalised: upper-case, only the two keys
    elif command == "CONFIGURE":
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
        for key in ("sync_interval", "command_poll_interval", "heartbeat_interval"):
            value = params.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 1 <= value <= 86400):
                raise Rejected(f"malformed: {key} must be a whole number of seconds, 1 to 86400")
    return command, params, expires


def parse_payload(raw: bytes, store) -> tuple[dict | None, int]:
    """Decode an MQTT payload; counts and logs what has no usable object."""
    size = len(raw)
    if size > MAX_PARSE_BYTES:
        _count(store, "too_large", f"{size} bytes")
        return None, size
    try:
        cmd = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        _count(store, "bad_json", str(exc)[:80])
        return None, size
    except RecursionError:
        _count(store, "bad_json", "nested too deep")
        return None, size
    if not isinstance(cmd, dict):
        _count(store, "not_object", type(cmd).__name__)
        return None, size
    return cmd, size


def _count(store, kind: str, detail: str) -> None:
    store.incr(f"bad_command.{kind}")
    _rejected_log(kind, detail)


def intake(rt, cmd: dict, source: str, size: int | None = None) -> str:
    """Put one command in the ledger (or reject it). Returns what happened, for logs/tests:
    ``queued``, ``done``, ``failed``, ``duplicate`` or ``dropped``."""
    store = rt.store
    if size is None:
        size = len(json.dumps(cmd, default=str))
    command_id = cmd.get("id")
    if not isinstance(command_id, str) or not 0 < len(command_id) <= MAX_ID:
        _count(store, "no_usable_id", repr(command_id)[:80])
        return "dropped"
    if store.known_command(command_id):
        store.incr("command.duplicate")
        return "duplicate"
    try:
        command, params, expires = _validate(cmd, rt.settings.device_id, size)
    except Rejected as exc:
        name = cmd.get("command") if isinstance(cmd.get("command"), str) else "?"
        if store.add_command(command_id, name[:64], {}, source, status="failed", reason=str(exc)):
            store.incr("bad_command.rejected")
            _rejected_log("rejected", f"{command_id}: {exc}")
            log.info("command %s from %s failed: %s", command_id, source, exc)
            rt.wake("acks")
            return "failed"
        return "duplicate"
    if command == "set_actuator":
        if not store.add_command(command_id, command, params, source, expires_at=expires):
            return "duplicate"
        log.info("command %s from %s: set %s %s (for the reader)", command_id, source,
                 params["actuator"], params["state"])
        return "queued"
    if not store.add_command(command_id, command, params, source, status="running"):
        return "duplicate"
    response = run_worker_command(rt, command, params)
    store.finish_command(command_id, True, response=response)
    log.info("command %s from %s (%s) completed", command_id, source, command)
    rt.wake("acks")
    return "done"


def run_worker_command(rt, command: str, params: dict) -> dict:
    if command == "REQUEST_STATUS":
        stats = rt.publish_status()
        return {"stats": stats}
    if command == "force_sync":
        rt.wake("sync")
        return {"sync": "enqueued"}
    if command == "CONFIGURE":
        current = rt.store.meta_get("configuration", {}) or {}
        if "thresholds" in params:
            merged = dict(current.get("thresholds", {}))
            for room, limits in params["thresholds"].items():
                merged[room] = {**merged.get(room, {}), **limits}
            current["thresholds"] = merged
        for key, value in params.items():
            if key != "thresholds":
                current[key] = value
        rt.store.meta_set("configuration", current)
        rt.reload_configuration()
        return {"configuration": current}
    raise AssertionError(command)
