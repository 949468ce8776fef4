"""The Arduino firmware's serial protocol (CONTRACT.md section 1), as pure functions.

``parse_line`` turns any byte string into one message object and never raises: the reader
can be fed line noise, a half-written line after an unplug or a firmware from the future.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

from mash.contract import ACTUATORS, MAX_BOARD_COMMAND, MAX_LINE, RANGES, ROOMS, STATES

_CMD_RE = re.compile(r"^\[CMD\] Set ([A-Z0-9_]+) to (ON|OFF)\s*$")
# The three [ERROR] lines the firmware prints in answer to a command.
_COMMAND_ERRORS = ("[ERROR] Unknown actuator", "[ERROR] deserializeJson() failed",
                   "[ERROR] Invalid JSON command format")
_INFO_PREFIXES = ("[OK]", "[SAFETY]", "[I2C]", "[WARNING]", "[INFO]", "[INIT]", "[WDT]", "====",
                  "M.A.S.H.", "Mushroom Automation", "[ERROR]")


@dataclass
class RoomReading:
    room: str
    temp: float
    humidity: float
    co2: int


@dataclass
class Reading:
    """One reading line: the good rooms, and a reason for each room that was not good."""
    rooms: list[RoomReading]
    rejected: dict[str, str] = field(default_factory=dict)   # room -> bad kind


@dataclass
class Ack:
    actuator: str
    state: str
    line: str


@dataclass
class CommandError:
    line: str


@dataclass
class BoardReset:
    """``[READY]``: the board booted and every relay is OFF."""
    line: str


@dataclass
class WatchdogRecovered:
    """``{"watchdog":"recovered"}``: the keepalive is back; relays are as they were, and a
    command written just before still runs (the gateway re-sends desired states anyway)."""
    line: str


@dataclass
class Watchdog:
    line: str


@dataclass
class Info:
    line: str


@dataclass
class Bad:
    kind: str
    detail: str


def _reject_constant(name):
    return float("nan")   # NaN/Infinity in JSON: parsed, then refused as not_a_number


def _room(room: str, data) -> RoomReading | str:
    """A RoomReading, or the bad kind that explains why this room's data is not one."""
    if not isinstance(data, dict):
        return "bad_room_data"
    if "error" in data:
        return "invalid_reading" if data.get("error") == "invalid_reading" else "sensor_error"
    values = {}
    for key, (lo, hi) in RANGES.items():
        if key not in data:
            return "missing_field"
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "not_a_number"
        if math.isnan(value) or math.isinf(value):
            return "not_a_number"
        if not lo <= value <= hi:
            return "out_of_range"
        values[key] = value
    return RoomReading(room, float(values["temp"]), float(values["humidity"]),
                       int(round(values["co2"])))


def parse_line(raw: bytes | str) -> object:
    """Classify one line from the board (without its newline). Never raises."""
    try:
        if isinstance(raw, bytes):
            if len(raw) > MAX_LINE:
                return Bad("too_long", f"{len(raw)} bytes")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                return Bad("not_utf8", repr(raw[:40]))
        else:
            text = raw
        text = text.strip("\r\n\x00 \t")
        if not text:
            return Info("")             # the boot banner prints blank lines
        if "\x00" in text or any(ord(c) < 32 and c not in "\t" for c in text):
            return Bad("control_bytes", repr(text[:40]))
        if text.startswith("{"):
            return _parse_json_line(text)
        if text.startswith("[CMD]"):
            m = _CMD_RE.match(text)
            if m and m.group(1) in ACTUATORS:
                return Ack(m.group(1), m.group(2), text)
            return Bad("bad_ack", text[:60])
        if text.startswith(_COMMAND_ERRORS):
            return CommandError(text)
        if text.startswith("[READY]"):
            return BoardReset(text)
        if text.startswith("[WATCHDOG]"):
            return Watchdog(text)
        if text.startswith(_INFO_PREFIXES):
            return Info(text)
        return Bad("unknown_line", text[:60])
    except Exception as exc:  # pragma: no cover - the contract is "never raises"
        return Bad("parser_error", repr(exc))


def _parse_json_line(text: str) -> object:
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        return Bad("bad_json", "nested too deep")
    except ValueError as exc:
        kind = "truncated" if not text.rstrip().endswith("}") else "bad_json"
        return Bad(kind, str(exc)[:60])
    if not isinstance(obj, dict):
        return Bad("bad_json", "not an object")
    if obj == {"watchdog": "recovered"}:
        return WatchdogRecovered(text)
    if not obj:
        return Bad("bad_json", "empty object")
    reading = Reading(rooms=[])
    for room, data in obj.items():
        if room not in ROOMS:
            reading.rejected[str(room)[:30]] = "unknown_room"
            continue
        result = _room(room, data)
        if isinstance(result, RoomReading):
            reading.rooms.append(result)
        else:
            reading.rejected[room] = result
    return reading


def encode_command(actuator: str, state: str) -> bytes:
    """The JSON line that sets one relay; raises ValueError for anything the board would refuse."""
    actuator, state = str(actuator).upper(), str(state).upper()
    if actuator not in ACTUATORS:
        raise ValueError(f"unknown actuator {actuator!r}")
    if state not in STATES:
        raise ValueError(f"state must be ON or OFF, not {state!r}")
    line = json.dumps({"actuator": actuator, "state": state}, separators=(",", ":")).encode() + b"\n"
    assert len(line) <= MAX_BOARD_COMMAND
    return line


def encode_reading(rooms: dict) -> bytes:
    """A reading line as the firmware prints it (used by the simulated board)."""
    return json.dumps(rooms, separators=(",", ":")).encode() + b"\n"
