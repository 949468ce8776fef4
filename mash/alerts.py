"""Threshold alerts with hysteresis, and stale-sensor detection.

A condition raises one alert when it starts and one ``cleared`` alert when it ends; the end
needs the value back inside the limit by a margin, so a reading wobbling on the limit does not
flap. Active conditions are rebuilt from the store at start, so a restart does not re-raise.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

# How far back inside the limit a value must come before the condition clears.
MARGINS = {"temp": 0.5, "humidity": 2.0, "co2": 50.0}
STALE_REPEAT_S = 600   # identical values for this long count as a stuck sensor


@dataclass(frozen=True)
class Condition:
    event_type: str
    severity: str
    quantity: str       # temp | humidity | co2
    limit: str          # the threshold key
    above: bool         # True: value > limit is the condition


CONDITIONS = (
    Condition("high_co2", "CRITICAL", "co2", "co2_critical", True),
    Condition("elevated_co2", "WARNING", "co2", "co2_max", True),
    Condition("high_temp", "WARNING", "temp", "temp_max", True),
    Condition("low_temp", "WARNING", "temp", "temp_min", False),
    Condition("high_humidity", "WARNING", "humidity", "humidity_max", True),
    Condition("low_humidity", "WARNING", "humidity", "humidity_min", False),
)
UNITS = {"temp": "C", "humidity": "%", "co2": "ppm"}


@dataclass
class AlertEvent:
    event_type: str
    severity: str
    room: str
    value: float | None
    threshold: float | None
    state: str          # raised | cleared
    message: str


class AlertEngine:
    """Feed it readings; it returns the alert events to store. Pure logic, no I/O."""

    def __init__(self, thresholds: dict, stale_after: float = 120.0, active=(),
                 clock=time.monotonic):
        self.thresholds = thresholds
        self.stale_after = stale_after
        self.active: set[tuple[str, str]] = set(active)     # (room, event_type)
        self.clock = clock
        self._last_seen: dict[str, float] = {}
        self._last_values: dict[str, tuple] = {}
        self._unchanged_since: dict[str, float] = {}
        self._started = clock()

    def _event(self, room, cond_type, severity, value, limit, state, message):
        key = (room, cond_type)
        if state == "raised":
            if key in self.active:
                return None
            self.active.add(key)
        else:
            if key not in self.active:
                return None
            self.active.discard(key)
        return AlertEvent(cond_type, severity, room, value, limit, state, message)

    def check_reading(self, room: str, temp: float, humidity: float, co2: float) -> list[AlertEvent]:
        now = self.clock()
        events = []
        values = {"temp": temp, "humidity": humidity, "co2": co2}
        limits = self.thresholds.get(room, {})
        for cond in CONDITIONS:
            limit = limits.get(cond.limit)
            key = (room, cond.event_type)
            if limit is None:
                if key in self.active:   # the limit was removed by CONFIGURE
                    events.append(self._event(room, cond.event_type, cond.severity, None, None,
                                              "cleared", f"{cond.event_type} limit removed in {room}"))
                continue
            value = values[cond.quantity]
            margin = MARGINS[cond.quantity]
            beyond = value > limit if cond.above else value < limit
            back = value <= limit - margin if cond.above else value >= limit + margin
            unit = UNITS[cond.quantity]
            word = "above" if cond.above else "below"
            if beyond:
                events.append(self._event(room, cond.event_type, cond.severity, value, limit, "raised",
                                          f"{room} {cond.quantity} {value:g} {unit} is {word} "
                                          f"{limit:g} {unit}"))
            elif back:
                events.append(self._event(room, cond.event_type, cond.severity, value, limit, "cleared",
                                          f"{room} {cond.quantity} back to {value:g} {unit}"))
        # Staleness: a reading arrived; clear "stopped", track "stuck".
        self._last_seen[room] = now
        triple = (temp, humidity, co2)
        if self._last_values.get(room) != triple:
            self._last_values[room] = triple
            self._unchanged_since[room] = now
            events.append(self._event(room, "sensor_stale", "WARNING", None, None, "cleared",
                                      f"{room} sensors reporting again"))
        return [e for e in events if e]

    def check_stale(self) -> list[AlertEvent]:
        """Call every few seconds: rooms whose readings stopped or are stuck."""
        now = self.clock()
        events = []
        for room in self.thresholds:
            seen = self._last_seen.get(room, self._started)
            if now - seen > self.stale_after:
                events.append(self._event(room, "sensor_stale", "WARNING", None, None, "raised",
                                          f"no valid {room} reading for {int(now - seen)} s"))
            elif now - self._unchanged_since.get(room, now) > max(STALE_REPEAT_S, self.stale_after):
                events.append(self._event(room, "sensor_stale", "WARNING", None, None, "raised",
                                          f"{room} readings unchanged for "
                                          f"{int(now - self._unchanged_since[room])} s"))
        return [e for e in events if e]
