"""The climate controller as pure logic, on a virtual clock: the rules, the safety limits and
the modes, and six simulated hours against the simulated chamber in lockstep."""
import datetime as dt
from collections import defaultdict
from zoneinfo import ZoneInfo

import pytest

from mash.chamber import Chamber
from mash.control import ClimateController
from mash.rules import ConfigError

BERLIN = ZoneInfo("Europe/Berlin")


class VirtualClock:
    def __init__(self, start=dt.datetime(2026, 1, 28, 10, 0, tzinfo=BERLIN)):
        self.t, self.start = 0.0, start

    def __call__(self):
        return self.t

    def wall(self):
        return self.start + dt.timedelta(seconds=self.t)


def confirm(ctl, actuator, state):
    """Our command, confirmed by the board at once (the reader's path, without the board)."""
    ctl.switched(actuator, state)
    ctl.known_state(actuator, state, "auto")


def run(ctl, chamber, clock, seconds, relays, switches, readings, every=5):
    """Advance the chamber and the controller one second at a time; a reading every 5 s."""
    for _ in range(int(seconds)):
        clock.t += 1.0
        chamber.step(1.0, relays)
        if int(clock.t) % every == 0:
            r = chamber.reading()
            for room, v in r.items():
                ctl.observe(room, v["temp"], v["humidity"], v["co2"])
            readings.append((clock.t, r))
        for actuator, state in ctl.decide().items():
            relays[actuator] = state
            confirm(ctl, actuator, state)
            switches.append((clock.t, actuator, state))


def durations(switches):
    """(actuator, state) -> every duration a relay stayed in that state."""
    out, last = defaultdict(list), {}
    for t, actuator, state in switches:
        if actuator in last:
            out[(actuator, last[actuator][1])].append(t - last[actuator][0])
        last[actuator] = (t, state)
    return out


@pytest.fixture
def loop():
    clock = VirtualClock()
    ctl = ClimateController(clock=clock, wallclock=clock.wall)
    return ctl, Chamber(fruiting=(24.0, 70.0, 800.0)), clock, {a: "OFF" for a in ctl.relays}


def test_six_simulated_hours_hold_fruiting_humidity_in_the_band(loop):
    ctl, chamber, clock, relays = loop
    switches, readings = [], []
    run(ctl, chamber, clock, 6 * 3600 + 600, relays, switches, readings)
    humidity = [(t, r["fruiting"]["humidity"]) for t, r in readings]
    reached = next(t for t, h in humidity if h >= 85)
    assert reached <= 600, f"85 % first reached after {reached} s"
    after = [h for t, h in humidity if t > reached]
    assert min(after) >= 85 and max(after) <= 95, (min(after), max(after))
    d = durations(switches)
    assert max(d[("MIST_MAKER", "ON")]) <= 60
    assert min(d[("MIST_MAKER", "OFF")]) >= 30 and min(d[("HUMIDIFIER_FAN", "ON")]) >= 30
    for fan in ("FRUITING_EXHAUST_FAN", "FRUITING_INTAKE_FAN", "SPAWNING_EXHAUST_FAN"):
        assert all(x >= 30 for key in (("ON",), ("OFF",)) for x in d[(fan, key[0])]), fan
    per_hour = len([s for s in switches if s[1] == "MIST_MAKER"]) / 6.17
    print(f"85 % after {reached:.0f} s; {per_hour:.0f} mist switches an hour; "
          f"humidity {min(after)}-{max(after)} %")


def test_co2_over_the_limit_runs_the_exhaust_until_below_900(loop):
    ctl, chamber, clock, relays = loop
    ctl.observe("fruiting", 24.0, 88.0, 1400)
    ctl.observe("spawning", 27.0, 72.0, 3000)
    assert ctl.decide()["FRUITING_EXHAUST_FAN"] == "ON"          # at once, on that reading
    confirm(ctl, "FRUITING_EXHAUST_FAN", "ON")
    confirm(ctl, "FRUITING_INTAKE_FAN", "OFF")
    for co2, state in ((950, "ON"), (905, "ON"), (899, "OFF")):
        clock.t += 40
        ctl.observe("fruiting", 24.0, 88.0, co2)
        assert ctl.decide().get("FRUITING_EXHAUST_FAN", ctl.relays["FRUITING_EXHAUST_FAN"].state) == state


def test_a_hot_fruiting_room_runs_the_exhaust_and_stops_the_intake(loop):
    ctl, _, clock, _ = loop
    ctl.observe("fruiting", 26.5, 88.0, 800)
    ctl.observe("spawning", 27.0, 72.0, 3000)
    wanted = ctl.decide()
    assert wanted["FRUITING_EXHAUST_FAN"] == "ON" and wanted["FRUITING_INTAKE_FAN"] == "ON"
    confirm(ctl, "FRUITING_EXHAUST_FAN", "ON")
    confirm(ctl, "FRUITING_INTAKE_FAN", "ON")
    clock.t += 31
    assert ctl.decide()["FRUITING_INTAKE_FAN"] == "OFF"          # follows what the exhaust does


def test_a_noisy_sensor_cannot_chatter_a_fan(loop):
    ctl, _, clock, _ = loop
    switches = []
    for i in range(600):
        clock.t += 1
        ctl.observe("fruiting", 24.0, 88.0, 1100 if i % 2 else 850)     # across both limits
        ctl.observe("spawning", 28.5 if i % 2 else 27.0, 72.0, 3000)
        for actuator, state in ctl.decide().items():
            confirm(ctl, actuator, state)
            switches.append((clock.t, actuator, state))
    d = durations(switches)
    for fan in ("FRUITING_EXHAUST_FAN", "SPAWNING_EXHAUST_FAN"):
        assert d[(fan, "ON")] and min(d[(fan, "ON")] + d[(fan, "OFF")]) >= 30, fan


def test_stale_or_impossible_readings_drive_the_safe_state(loop):
    ctl, _, clock, _ = loop
    ctl.observe("fruiting", 24.0, 70.0, 800)
    ctl.observe("spawning", 27.0, 72.0, 3000)
    assert ctl.decide()["MIST_MAKER"] == "ON"
    confirm(ctl, "MIST_MAKER", "ON")
    clock.t += 121                                            # STALE_AFTER (120 s) passed
    wanted = ctl.decide()
    assert wanted["MIST_MAKER"] == "OFF" and wanted["FRUITING_EXHAUST_FAN"] == "ON"
    assert ctl.stale("fruiting") and ctl.stale("spawning")
    ctl.observe("fruiting", 24.0, 70.0, 800)                  # fresh again: control resumes
    assert not ctl.stale("fruiting")
    ctl.observe("spawning", 27.0, 72.0, 6000)                 # out of the firmware's range
    assert ctl.stale("spawning")


def test_mist_never_stays_on_past_60_s_even_when_overridden(loop):
    ctl, _, clock, _ = loop
    ctl.observe("fruiting", 24.0, 70.0, 800)
    ctl.observe("spawning", 27.0, 72.0, 3000)
    ctl.known_state("MIST_MAKER", "ON", "mqtt")               # the grower asked for it
    clock.t += 59
    assert "MIST_MAKER" not in ctl.decide()
    clock.t += 1
    assert ctl.decide()["MIST_MAKER"] == "OFF"


def test_an_override_holds_its_actuator_then_auto_resumes(loop):
    ctl, _, clock, _ = loop
    ctl.override_s = 1800
    ctl.observe("fruiting", 24.0, 88.0, 800)
    ctl.observe("spawning", 27.0, 72.0, 3000)
    ctl.known_state("FRUITING_EXHAUST_FAN", "ON", "backend")
    for minutes in (1, 15, 29):
        clock.t = minutes * 60.0
        ctl.observe("fruiting", 24.0, 88.0, 800)
        assert "FRUITING_EXHAUST_FAN" not in ctl.decide()
    clock.t = 30 * 60.0 + 1
    ctl.observe("fruiting", 24.0, 88.0, 800)
    assert ctl.decide()["FRUITING_EXHAUST_FAN"] == "OFF"


def test_manual_rooms_and_mode_off(loop):
    ctl, _, clock, _ = loop
    ctl.set_room_modes({"fruiting": "manual"})
    ctl.observe("fruiting", 24.0, 70.0, 1400)
    ctl.observe("spawning", 29.0, 72.0, 3000)
    assert set(ctl.decide()) == {"SPAWNING_EXHAUST_FAN"}       # only the auto room
    off = ClimateController(mode="off", clock=clock, wallclock=clock.wall)
    off.observe("fruiting", 24.0, 70.0, 1400)
    off.known_state("MIST_MAKER", "ON", "mqtt")
    clock.t += 3600
    assert off.decide() == {}                                 # never writes, not even the cap
    with pytest.raises(ConfigError):
        ctl.set_room_modes({"cellar": "auto"})


@pytest.mark.parametrize("local, on", [("07:59", False), ("08:00", True), ("19:59", True),
                                       ("20:00", False)])
def test_led_schedule_in_local_time(local, on):
    h, m = map(int, local.split(":"))
    wall = dt.datetime(2026, 6, 1, h, m, tzinfo=BERLIN)
    ctl = ClimateController(wallclock=lambda: wall)
    ctl.relays["FRUITING_LED"].state = "OFF" if on else "ON"
    assert ctl.decide()["FRUITING_LED"] == ("ON" if on else "OFF")


def test_led_schedule_across_the_spring_and_autumn_dst_changes():
    for day in (dt.date(2026, 3, 29), dt.date(2026, 10, 25)):        # Europe's DST changes
        midnight = dt.datetime.combine(day, dt.time(0, 0), tzinfo=BERLIN).astimezone(dt.timezone.utc)
        seen = {}
        for minute in range(0, 24 * 60, 1):
            wall = (midnight + dt.timedelta(minutes=minute)).astimezone(BERLIN)
            ctl = ClimateController(wallclock=lambda wall=wall: wall)
            seen[wall.strftime("%H:%M")] = ctl.decide().get("FRUITING_LED", "OFF")
        assert seen["07:59"] == "OFF" and seen["08:00"] == "ON"
        assert seen["19:59"] == "ON" and seen["20:00"] == "OFF"


def test_spawning_air_exchange_five_minutes_every_four_hours():
    wall = [dt.datetime(2026, 1, 28, 4, 0, tzinfo=BERLIN)]
    ctl = ClimateController(wallclock=lambda: wall[0])
    ctl.observe("spawning", 27.0, 72.0, 3000)
    ctl.observe("fruiting", 24.0, 88.0, 800)
    assert ctl.decide()["SPAWNING_EXHAUST_FAN"] == "ON"
    confirm(ctl, "SPAWNING_EXHAUST_FAN", "ON")
    wall[0] = dt.datetime(2026, 1, 28, 4, 5, tzinfo=BERLIN)
    ctl.relays["SPAWNING_EXHAUST_FAN"].since = -1000
    assert ctl.decide()["SPAWNING_EXHAUST_FAN"] == "OFF"


def test_bad_control_rules_are_refused_with_the_key():
    with pytest.raises(ConfigError, match="fruiting: unknown rule 'humidity'"):
        ClimateController(rules={"fruiting": {"humidity": 80}})
    with pytest.raises(ConfigError, match="humidity_low < humidity_target"):
        ClimateController(rules={"fruiting": {"humidity_low": 92}})
