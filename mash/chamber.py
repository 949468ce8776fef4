"""The simulated chamber behind the simulated board: rooms that answer the relays.

So ``mash run`` with no Arduino shows the climate control holding a room, and the tests can
prove it. A first-order model per quantity, integrated in simulated seconds (``SimClock``
runs it faster than the wall for the tests). The constants, per second:

- humidifier: MIST_MAKER ON makes fog at ``MIST_RATE`` (% of room humidity per s) in the
  humidifier; HUMIDIFIER_FAN ON blows it into the room with time constant ``FAN_TAU`` and
  ``FAN_EFFICIENCY`` (without the fan it drifts in with ``DIFFUSE_TAU``); fog condenses
  with ``FOG_TAU``;
- humidity leaks toward ``AMBIENT["humidity"]`` with ``LEAK_TAU``, faster with the exhaust
  (``EXHAUST_TAU``) or the intake (``INTAKE_TAU``) running;
- CO2: the mushrooms respire ``RESPIRATION`` ppm/s; air exchange pulls it toward ambient
  with the same time constants;
- temperature: toward the room's own ``REST_TEMP`` with ``LEAK_TAU``, toward the outside air
  with the exhaust; the fruiting LEDs add ``LED_HEAT``, the spawn ``SPAWN_HEAT``.

A reading is rounded as the firmware prints it and clamped to the sensor's range.
"""
from __future__ import annotations

import datetime as dt
import math
import threading
import time

AMBIENT = {"temp": 22.0, "humidity": 60.0, "co2": 420.0}
MIST_RATE = 1.0
FAN_TAU = 8.0
DIFFUSE_TAU = 40.0
FAN_EFFICIENCY = 0.6
FOG_TAU = 60.0
LEAK_TAU = 1500.0
EXHAUST_TAU = 300.0
INTAKE_TAU = 1200.0
RESPIRATION = {"fruiting": 0.8, "spawning": 1.5}
REST_TEMP = {"fruiting": 24.5, "spawning": 26.0}
LED_HEAT = 0.0008
SPAWN_HEAT = 0.0015


class SimClock:
    """Simulated seconds, ``speed`` times faster than the wall. ``now()`` is monotonic;
    ``wall()`` is the local time the simulation has reached from ``start``."""

    def __init__(self, speed: float = 1.0, start: dt.datetime | None = None):
        self.speed = speed
        self.start = start or dt.datetime.now().astimezone()
        self._t0 = time.monotonic()

    def now(self) -> float:
        return (time.monotonic() - self._t0) * self.speed

    __call__ = now

    def wall(self) -> dt.datetime:
        return self.start + dt.timedelta(seconds=self.now())

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds / self.speed)


def _toward(value: float, target: float, tau: float, dt_s: float) -> float:
    return target + (value - target) * math.exp(-dt_s / tau)


class Chamber:
    def __init__(self, fruiting=(24.0, 70.0, 800.0), spawning=(27.0, 72.0, 3000.0)):
        self.rooms = {"fruiting": dict(zip(("temp", "humidity", "co2"), map(float, fruiting))),
                      "spawning": dict(zip(("temp", "humidity", "co2"), map(float, spawning)))}
        self.fog = 0.0
        self.lock = threading.Lock()

    def step(self, dt_s: float, relays: dict) -> None:
        """Advance ``dt_s`` simulated seconds with the relays as they are."""
        on = {name for name, state in relays.items() if state == "ON"}
        remaining = max(0.0, dt_s)
        with self.lock:
            while remaining > 0:        # at most 1 s a step: the fan and fog terms are fast
                d = min(1.0, remaining)
                remaining -= d
                self._step(d, on)

    def _step(self, d: float, on: set) -> None:
        f, s = self.rooms["fruiting"], self.rooms["spawning"]
        if "MIST_MAKER" in on:
            self.fog += MIST_RATE * d
        moved = self.fog * (1 - math.exp(-d / (FAN_TAU if "HUMIDIFIER_FAN" in on else DIFFUSE_TAU)))
        self.fog -= moved
        f["humidity"] += moved * FAN_EFFICIENCY
        self.fog *= math.exp(-d / FOG_TAU)
        for room, exhaust, intake in (("fruiting", "FRUITING_EXHAUST_FAN", "FRUITING_INTAKE_FAN"),
                                      ("spawning", "SPAWNING_EXHAUST_FAN", None)):
            r = self.rooms[room]
            taus = [LEAK_TAU] + ([EXHAUST_TAU] if exhaust in on else []) + \
                ([INTAKE_TAU] if intake in on else [])
            air = 1.0 / sum(1.0 / t for t in taus)           # the exchanges add up
            r["humidity"] = _toward(r["humidity"], AMBIENT["humidity"], air, d)
            r["co2"] = _toward(r["co2"], AMBIENT["co2"], air, d) + RESPIRATION[room] * d
            r["temp"] = _toward(r["temp"], REST_TEMP[room], LEAK_TAU, d)
            if exhaust in on:
                r["temp"] = _toward(r["temp"], AMBIENT["temp"], EXHAUST_TAU, d)
        if "FRUITING_LED" in on:
            f["temp"] += LED_HEAT * d
        s["temp"] += SPAWN_HEAT * d

    def reading(self) -> dict:
        """Both rooms as the firmware prints them."""
        with self.lock:
            return {room: {"temp": round(min(max(v["temp"], -10.0), 60.0), 1),
                           "humidity": round(min(max(v["humidity"], 0.0), 100.0), 1),
                           "co2": int(min(max(v["co2"], 400.0), 5000.0))}
                    for room, v in self.rooms.items()}
