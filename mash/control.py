"""Local climate control (CONTRACT §7): the rooms kept right with the uplink down.

Pure logic with injectable clocks, like ``mash.alerts``: the reader feeds it every stored
reading (``observe``) and asks it every second what to change (``decide``); it owns no I/O.
The reader writes each change through the command ledger (source ``auto``), so the board's
``[CMD]`` reply confirms it like any other command.

The rules (defaults, each configurable per room through ``CONFIGURE {"control": ...}``):

- fruiting humidity: below ``humidity_low`` (85 %), or when the trend says it will be before
  a cycle could land, start the humidifier cycle, MIST_MAKER
  ON ``mist_s`` (10 s) with HUMIDIFIER_FAN OFF, then HUMIDIFIER_FAN ON ``fan_s`` (30 s) with
  MIST_MAKER OFF, alternating; stop at ``humidity_target`` (90 %) or more when the trend says
  one more cycle would pass ``humidity_high`` (95 %), and always at 95 %;
- fruiting CO2 above ``co2_on`` (1000 ppm) or temperature above ``temp_on`` (26 C):
  FRUITING_EXHAUST_FAN ON until below ``co2_off`` (900) and ``temp_off`` (25.5);
  FRUITING_INTAKE_FAN runs when the exhaust does not (air circulation);
- FRUITING_LED ON from ``light_on`` to ``light_off`` (08:00-20:00) in the Pi's local time;
- spawning: SPAWNING_EXHAUST_FAN ON above ``temp_on`` (28 C) until below ``temp_off``
  (27.5 C), and for ``exchange_s`` (5 min) every ``exchange_every_s`` (4 h), counted from
  local midnight.

Safety, whatever the readings do:
- a fan never switches again within ``min_switch_s`` (30 s) of its last switch; the mist
  cycle's relays keep their phases (mist on at most one phase, off at least one fan phase);
- MIST_MAKER is never ON more than ``mist_max_s`` (60 s) in a row, in every mode but ``off``;
- a room whose last reading is older than ``stale_after`` or out of the firmware's range is
  driven to its safe state (mist and humidifier fan OFF, exhaust ``safe_exhaust``) until a
  fresh reading comes;
- hysteresis on every rule, and the minimum times above, so a noisy sensor cannot chatter.

Modes: ``CONTROL_MODE`` ``auto`` (rules drive every room in auto), ``manual`` (no rules;
the mist cap still holds) or ``off`` (never writes a relay). A room is ``auto`` or
``manual`` (``CONFIGURE {"mode": {...}}``). A remote or local ``set_actuator`` holds that
actuator out of automatic control for ``OVERRIDE_MINUTES``.
"""
from __future__ import annotations

import datetime as dt
import time
from collections import deque
from dataclasses import dataclass, field

from mash.contract import CONTROL_MODES as MODES
from mash.contract import RANGES, ROOM_MODES, ROOMS
from mash.rules import DEFAULT_CONTROL, ConfigError, clock_time, merge_control


FRUITING_RELAYS = ("MIST_MAKER", "HUMIDIFIER_FAN", "FRUITING_EXHAUST_FAN", "FRUITING_INTAKE_FAN",
                   "FRUITING_LED")
SPAWNING_RELAYS = ("SPAWNING_EXHAUST_FAN",)
ROOM_OF = {**{a: "fruiting" for a in FRUITING_RELAYS}, **{a: "spawning" for a in SPAWNING_RELAYS}}
TREND_WINDOW_S = 120.0


def effective_modes(control_mode: str, configured: dict | None) -> dict[str, str]:
    """What drives each room: CONTROL_MODE, then a room's CONFIGURE'd mode when it is auto."""
    rooms = {room: "auto" for room in ROOMS}
    rooms.update({r: m for r, m in (configured or {}).items() if r in ROOMS and m in ROOM_MODES})
    return {room: control_mode if control_mode != "auto" else m for room, m in rooms.items()}


@dataclass
class Relay:
    state: str = "OFF"                # as the board last confirmed it
    since: float = float("-inf")      # when it did (controller clock); -inf: free to switch
    source: str = "auto"
    pending: str | None = None        # a command of ours not yet confirmed


@dataclass
class RoomView:
    values: dict | None = None        # temp, humidity, co2 of the last reading
    at: float | None = None           # when it arrived (controller clock)
    out_of_range: bool = False
    humidity: deque = field(default_factory=lambda: deque(maxlen=64))   # (t, %)


class ClimateController:
    def __init__(self, rules: dict | None = None, mode: str = "auto", room_modes: dict | None = None,
                 override_s: float = 1800.0, stale_after: float = 120.0,
                 clock=time.monotonic, wallclock=None):
        if mode not in MODES:
            raise ConfigError("CONTROL_MODE", f"must be one of {', '.join(MODES)}", mode)
        self.rules = merge_control(DEFAULT_CONTROL, rules or {})
        self.mode = mode
        self.room_modes = {room: "auto" for room in ROOMS}
        self.set_room_modes(room_modes or {})
        self.override_s = override_s
        self.stale_after = stale_after
        self.clock = clock
        self.wallclock = wallclock or (lambda: dt.datetime.now().astimezone())
        self.relays = {a: Relay() for a in ROOM_OF}
        self.rooms = {room: RoomView() for room in ROOMS}
        self.overrides: dict[str, float] = {}       # actuator -> until (controller clock)
        self.cycle: str | None = None                # None | "mist" | "fan"
        self.phase_started = float("-inf")
        self.cycle_from = 0.0                        # humidity when the current cycle began
        self.exhaust_for = {"co2": False, "temp": False}
        self.spawn_hot = False

    # -- configuration ----------------------------------------------------------------------
    def set_room_modes(self, modes: dict) -> None:
        for room, m in modes.items():
            if room not in ROOMS or m not in ROOM_MODES:
                raise ConfigError("mode", f"{room!r} must be a room and {m!r} one of "
                                          f"{', '.join(ROOM_MODES)}")
        self.room_modes.update(modes)

    def room_mode(self, room: str) -> str:
        """What drives ``room`` now: ``auto``, ``manual`` or ``off``."""
        return effective_modes(self.mode, self.room_modes)[room]

    # -- inputs ---------------------------------------------------------------------------
    def observe(self, room: str, temp: float, humidity: float, co2: float) -> None:
        """A stored reading of ``room``."""
        now = self.clock()
        view = self.rooms[room]
        view.values = {"temp": temp, "humidity": humidity, "co2": co2}
        view.at = now
        view.out_of_range = any(not lo <= view.values[k] <= hi for k, (lo, hi) in RANGES.items())
        view.humidity.append((now, humidity))

    def known_state(self, actuator: str, state: str, source: str) -> None:
        """A relay's state as the board confirmed it (any source): the minimum times count
        from here. A remote or local command takes the actuator out of automatic control for
        ``override_s``."""
        if actuator not in self.relays:
            return
        now = self.clock()
        relay = self.relays[actuator]
        if relay.pending == state:
            relay.pending = None
        if relay.state != state:
            relay.state, relay.since = state, now
        relay.source = source
        if source in ("backend", "mqtt", "local"):
            self.overrides[actuator] = now + self.override_s

    def refused(self, actuator: str) -> None:
        """Our command for ``actuator`` failed on the board: decide it again."""
        if actuator in self.relays:
            self.relays[actuator].pending = None

    def board_reset(self) -> None:
        """The board booted: every relay is OFF now (commands still queued will follow)."""
        now = self.clock()
        for relay in self.relays.values():
            if relay.state != "OFF":
                relay.state, relay.since = "OFF", now
        self.cycle = None

    # -- the decision ------------------------------------------------------------------------
    def stale(self, room: str, now: float | None = None) -> bool:
        view = self.rooms[room]
        now = self.clock() if now is None else now
        return view.at is None or now - view.at > self.stale_after or view.out_of_range

    def decide(self) -> dict[str, str]:
        """The relays to switch now: {actuator: ON|OFF}. The caller writes them and reports
        back through ``switched`` (or ``known_state`` once the board confirms)."""
        if self.mode == "off":
            return {}
        now = self.clock()
        wanted: dict[str, str] = {}
        if self.room_mode("fruiting") == "auto":
            wanted.update(self._fruiting(now))
        if self.room_mode("spawning") == "auto":
            wanted.update(self._spawning(now))
        # the mist's hard cap holds in every mode but off, overrides included
        force = set()
        mist = self.relays["MIST_MAKER"]
        if mist.state == "ON" and now - mist.since >= self.rules["mist_max_s"] and mist.pending != "OFF":
            wanted["MIST_MAKER"] = "OFF"
            force.add("MIST_MAKER")
        return self._allowed(wanted, now, force)

    def switched(self, actuator: str, state: str) -> None:
        """The caller queued ``state`` for ``actuator``: nothing more is decided for that
        relay until the board confirms it (``known_state``) or refuses it (``refused``)."""
        self.relays[actuator].pending = state

    def _allowed(self, wanted: dict, now: float, force=()) -> dict:
        """Drop what is overridden, unchanged, or too soon after the relay's last switch."""
        out = {}
        for actuator, state in wanted.items():
            relay = self.relays[actuator]
            if relay.pending is not None or relay.state == state:
                continue
            if actuator not in force and self.overrides.get(actuator, float("-inf")) > now:
                continue
            if actuator not in force and now - relay.since < self._min_time(actuator, relay.state):
                continue
            out[actuator] = state
        return out

    def _min_time(self, actuator: str, current: str) -> float:
        """How long a relay stays in ``current`` before it may switch."""
        f = self.rules["fruiting"]
        if actuator == "MIST_MAKER":
            return 0.0 if current == "ON" else f["fan_s"]     # on: cut short at will; off: a fan phase
        if actuator == "HUMIDIFIER_FAN":
            return f["fan_s"] if current == "ON" else f["mist_s"]
        if actuator == "FRUITING_LED":
            return 0.0
        return self.rules["min_switch_s"]

    # -- fruiting ------------------------------------------------------------------------------
    def _fruiting(self, now: float) -> dict:
        f = self.rules["fruiting"]
        wanted = {"FRUITING_LED": "ON" if self._light_on(f) else "OFF"}
        if self.stale("fruiting", now):
            self.cycle = None
            wanted.update(MIST_MAKER="OFF", HUMIDIFIER_FAN="OFF",
                          FRUITING_EXHAUST_FAN=f["safe_exhaust"],
                          FRUITING_INTAKE_FAN="OFF" if f["safe_exhaust"] == "ON" else "ON")
            return wanted
        v = self.rooms["fruiting"].values
        wanted.update(self._humidifier(now, v["humidity"], f))
        if v["co2"] > f["co2_on"]:
            self.exhaust_for["co2"] = True
        elif v["co2"] < f["co2_off"]:
            self.exhaust_for["co2"] = False
        if v["temp"] > f["temp_on"]:
            self.exhaust_for["temp"] = True
        elif v["temp"] < f["temp_off"]:
            self.exhaust_for["temp"] = False
        exhaust = any(self.exhaust_for.values())
        wanted["FRUITING_EXHAUST_FAN"] = "ON" if exhaust else "OFF"
        # circulation follows what the exhaust does (or is being switched to), not what a
        # rule would like it to do while its minimum time holds it
        relay = self.relays["FRUITING_EXHAUST_FAN"]
        wanted["FRUITING_INTAKE_FAN"] = "OFF" if (relay.pending or relay.state) == "ON" else "ON"
        return wanted

    def _humidifier(self, now: float, humidity: float, f: dict) -> dict:
        if humidity >= f["humidity_high"]:
            self.cycle = None
        elif self.cycle is None and (humidity < f["humidity_low"] or humidity + self.trend() *
                                     (f["mist_s"] + f["fan_s"]) < f["humidity_low"]):
            self._phase("mist", now)      # below the band, or would be before a cycle lands
        elif self.cycle == "mist" and now - self.phase_started >= f["mist_s"]:
            self._phase("fan", now)
        elif self.cycle == "fan" and now - self.phase_started >= f["fan_s"]:
            # what one more cycle would add: as much as the last one did, or the trend's
            gain = max(humidity - self.cycle_from, self.trend() * (f["mist_s"] + f["fan_s"]))
            if humidity >= f["humidity_target"] and humidity + gain >= f["humidity_high"]:
                self.cycle = None
            else:
                self._phase("mist", now)
        if self.cycle == "mist":
            return {"MIST_MAKER": "ON", "HUMIDIFIER_FAN": "OFF"}
        if self.cycle == "fan":
            return {"MIST_MAKER": "OFF", "HUMIDIFIER_FAN": "ON"}
        return {"MIST_MAKER": "OFF", "HUMIDIFIER_FAN": "OFF"}

    def _phase(self, phase: str, now: float) -> None:
        self.cycle, self.phase_started = phase, now
        if phase == "mist":
            view = self.rooms["fruiting"]
            self.cycle_from = view.values["humidity"] if view.values else 0.0

    def trend(self) -> float:
        """Fruiting humidity's slope (% per second) over the last two minutes, by least
        squares; 0 with fewer than three readings."""
        points = list(self.rooms["fruiting"].humidity)
        if points:
            points = [p for p in points if p[0] >= points[-1][0] - TREND_WINDOW_S]
        if len(points) < 3:
            return 0.0
        n = len(points)
        mt = sum(t for t, _ in points) / n
        mh = sum(h for _, h in points) / n
        var = sum((t - mt) ** 2 for t, _ in points)
        if var == 0:
            return 0.0
        return sum((t - mt) * (h - mh) for t, h in points) / var

    def _light_on(self, f: dict) -> bool:
        local = self.wallclock().time().replace(tzinfo=None)
        on, off = clock_time(f["light_on"]), clock_time(f["light_off"])
        if on <= off:
            return on <= local < off
        return local >= on or local < off        # a night-time schedule across midnight

    # -- spawning ------------------------------------------------------------------------------
    def _spawning(self, now: float) -> dict:
        s = self.rules["spawning"]
        if self.stale("spawning", now):
            return {"SPAWNING_EXHAUST_FAN": s["safe_exhaust"]}
        temp = self.rooms["spawning"].values["temp"]
        if temp > s["temp_on"]:
            self.spawn_hot = True
        elif temp < s["temp_off"]:
            self.spawn_hot = False
        local = self.wallclock()
        since_midnight = local.hour * 3600 + local.minute * 60 + local.second
        exchange = since_midnight % s["exchange_every_s"] < s["exchange_s"]
        return {"SPAWNING_EXHAUST_FAN": "ON" if self.spawn_hot or exchange else "OFF"}

    # -- status -----------------------------------------------------------------------------------
    def status(self) -> dict:
        return {"mode": {room: self.room_mode(room) for room in ROOMS},
                "overrides": {a: round(until - self.clock(), 1) for a, until in self.overrides.items()
                              if until > self.clock()}}
