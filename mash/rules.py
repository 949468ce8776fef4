"""The gateway's own rules, defined and checked once: alert limits and climate-control rules.

Their defaults, and the merge of an override (from ``config/.env`` or a ``CONFIGURE``
command) over them; a bad override raises ``ConfigError`` naming the key and why.
"""
from __future__ import annotations

import datetime as dt

from mash.contract import ROOMS


class ConfigError(ValueError):
    """A configuration value the gateway cannot run with; ``str()`` is the one line to show."""

    def __init__(self, key: str, why: str, value: object = None):
        self.key, self.why = key, why
        shown = "" if value is None or "PASSWORD" in key else f"={value}"
        super().__init__(f"configuration error: {key}{shown}: {why}")


# Per-room alert limits. ``co2_critical`` is the guide's ``co2 > 1500 -> CRITICAL high_co2``;
# it is a fruiting-room rule: a spawning room runs at 2,000-5,000 ppm on purpose (the firmware's
# own sample reads 3,100), so it has no CO2 limit unless ALERT_THRESHOLDS gives one.
DEFAULT_THRESHOLDS = {
    "fruiting": {"temp_min": 22.0, "temp_max": 26.0, "humidity_min": 80.0, "co2_max": 1000.0,
                 "co2_critical": 1500.0},
    "spawning": {"temp_min": 26.0, "temp_max": 30.0, "humidity_min": 65.0},
}
THRESHOLD_KEYS = ("temp_min", "temp_max", "humidity_min", "humidity_max", "co2_max",
                  "co2_critical")


def merge_thresholds(base: dict, override: object, key: str = "ALERT_THRESHOLDS") -> dict:
    """Overlay ``override`` ({room: {limit: number}}) on ``base``; raise ConfigError on any
    unknown room, unknown limit or non-number. Used for .env and the CONFIGURE command."""
    if not isinstance(override, dict):
        raise ConfigError(key, "must be a JSON object of rooms")
    merged = {room: dict(limits) for room, limits in base.items()}
    for room, limits in override.items():
        if room not in ROOMS:
            raise ConfigError(key, f"unknown room {room!r} (rooms: {', '.join(ROOMS)})")
        if not isinstance(limits, dict):
            raise ConfigError(key, f"{room}: must be an object of limits")
        merged.setdefault(room, {})
        for name, value in limits.items():
            if name not in THRESHOLD_KEYS:
                raise ConfigError(key, f"{room}: unknown limit {name!r} "
                                       f"(limits: {', '.join(THRESHOLD_KEYS)})")
            if value is None:
                merged[room].pop(name, None)
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise ConfigError(key, f"{room}.{name}: must be a number")
            merged[room][name] = float(value)
    for room, limits in merged.items():        # the result, not only the rooms overridden
        for low, high in (("temp_min", "temp_max"), ("humidity_min", "humidity_max")):
            lo, hi = limits.get(low), limits.get(high)
            if lo is not None and hi is not None and lo >= hi:
                raise ConfigError(key, f"{room}: {low} ({lo:g}) must be below {high} ({hi:g})")
    return merged


# Climate control (mash/control.py explains each rule).
DEFAULT_CONTROL = {
    "fruiting": {"humidity_low": 85.0, "humidity_target": 90.0, "humidity_high": 95.0,
                 "mist_s": 10.0, "fan_s": 30.0, "co2_on": 1000.0, "co2_off": 900.0,
                 "temp_on": 26.0, "temp_off": 25.5, "light_on": "08:00", "light_off": "20:00",
                 "safe_exhaust": "ON"},
    "spawning": {"temp_on": 28.0, "temp_off": 27.5, "exchange_every_s": 4 * 3600.0,
                 "exchange_s": 300.0, "safe_exhaust": "OFF"},
    "min_switch_s": 30.0,
    "mist_max_s": 60.0,
}


def merge_control(base: dict, override: object, key: str = "CONTROL_RULES") -> dict:
    """``override`` ({room: {rule: value}}, plus ``min_switch_s`` / ``mist_max_s``) laid over
    ``base``; raises ConfigError (naming ``key``) on an unknown room or rule, a value of the
    wrong kind (``overlay_control``) or rules that contradict each other in the result
    (``check_control``). Used for .env and the CONFIGURE command's ``control``."""
    return check_control(overlay_control(base, override, key), key)


def overlay_control(base: dict, override: object, key: str = "CONTROL_RULES") -> dict:
    """``override`` laid over ``base``, each value checked on its own (its name and kind)."""
    def fail(why):
        raise ConfigError(key, why)
    if not isinstance(override, dict):
        fail("must be a JSON object of rooms")
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for room_key, value in override.items():
        if room_key in ("min_switch_s", "mist_max_s"):
            merged[room_key] = _seconds(room_key, value, fail)
            continue
        if room_key not in ROOMS:
            fail(f"unknown room {room_key!r} (rooms: {', '.join(ROOMS)})")
        if not isinstance(value, dict):
            fail(f"{room_key}: must be an object of rules")
        for name, v in value.items():
            if name not in base[room_key]:
                fail(f"{room_key}: unknown rule {name!r} (rules: {', '.join(base[room_key])})")
            if name in ("light_on", "light_off"):
                _clock_time(f"{room_key}.{name}", v, fail)
            elif name == "safe_exhaust":
                if v not in ("ON", "OFF"):
                    fail(f"{room_key}.safe_exhaust must be ON or OFF")
            else:
                v = (_seconds(f"{room_key}.{name}", v, fail) if name.endswith("_s")
                     else _number(f"{room_key}.{name}", v, fail))
            merged[room_key][name] = v
    return merged


def check_control(merged: dict, key: str = "CONTROL_RULES") -> dict:
    """``merged`` unless its rules contradict each other (ConfigError naming ``key``)."""
    def fail(why):
        raise ConfigError(key, why)
    f = merged["fruiting"]
    if not f["humidity_low"] < f["humidity_target"] < f["humidity_high"] <= 100:
        fail("fruiting: humidity_low < humidity_target < humidity_high <= 100")
    for room in ROOMS:
        r = merged[room]
        if r["temp_off"] >= r["temp_on"]:
            fail(f"{room}: temp_off ({r['temp_off']:g}) must be below temp_on ({r['temp_on']:g})")
    if f["co2_off"] >= f["co2_on"]:
        fail(f"fruiting: co2_off ({f['co2_off']:g}) must be below co2_on ({f['co2_on']:g})")
    if merged["mist_max_s"] < f["mist_s"]:
        fail("mist_max_s must be at least fruiting.mist_s")
    return merged


def _number(name, value, fail) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        fail(f"{name} must be a number")
    return float(value)


def _seconds(name, value, fail) -> float:
    value = _number(name, value, fail)
    if not 0 < value <= 7 * 86400:
        fail(f"{name} must be between 0 and 604800 seconds")
    return value


def _clock_time(name, value, fail) -> dt.time:
    try:
        return dt.time.fromisoformat(value)
    except (TypeError, ValueError):
        fail(f"{name} must be a local time like 08:00")


def clock_time(value: str) -> dt.time:
    """A validated ``HH:MM`` rule value as a time."""
    return dt.time.fromisoformat(value)
