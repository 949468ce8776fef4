from mash.alerts import AlertEngine
from mash.config import Settings


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def engine(clock=None, active=()):
    return AlertEngine(Settings.from_mapping({}).thresholds, stale_after=120, active=active,
                       clock=clock or Clock())


def kinds(events):
    return [(e.room, e.event_type, e.state) for e in events]


def test_high_co2_raised_once_and_cleared_with_hysteresis():
    e = engine()
    assert ("fruiting", "high_co2", "raised") in kinds(e.check_reading("fruiting", 24, 85, 1600))
    assert not [x for x in e.check_reading("fruiting", 24, 85, 1700) if x.event_type == "high_co2"]
    # back under 1500 but inside the margin: still on
    assert not [x for x in e.check_reading("fruiting", 24, 85, 1480) if x.event_type == "high_co2"]
    cleared = [x for x in e.check_reading("fruiting", 24, 85, 1400) if x.event_type == "high_co2"]
    assert kinds(cleared) == [("fruiting", "high_co2", "cleared")]
    assert cleared[0].severity == "CRITICAL"


def test_room_ranges_use_the_issue_defaults():
    e = engine()
    assert kinds(e.check_reading("fruiting", 21.0, 79.0, 800)) == [
        ("fruiting", "low_temp", "raised"), ("fruiting", "low_humidity", "raised")]
    assert kinds(e.check_reading("spawning", 31.0, 64.0, 800)) == [
        ("spawning", "high_temp", "raised"), ("spawning", "low_humidity", "raised")]
    assert kinds(e.check_reading("fruiting", 24.0, 85.0, 1100)) == [
        ("fruiting", "elevated_co2", "raised"), ("fruiting", "low_temp", "cleared"),
        ("fruiting", "low_humidity", "cleared")]


def test_restart_does_not_raise_again():
    e = engine(active={("fruiting", "high_co2")})
    assert not [x for x in e.check_reading("fruiting", 24, 85, 1600) if x.event_type == "high_co2"]


def test_stopped_and_stuck_sensors_raise_sensor_stale():
    clock = Clock()
    e = engine(clock)
    e.check_reading("fruiting", 24, 85, 800)
    e.check_reading("spawning", 28, 70, 900)
    clock.t += 60
    e.check_reading("spawning", 28.1, 70, 900)
    assert e.check_stale() == []
    clock.t += 90            # fruiting silent for 150 s
    assert kinds(e.check_stale()) == [("fruiting", "sensor_stale", "raised")]
    assert e.check_stale() == []
    assert ("fruiting", "sensor_stale", "cleared") in kinds(e.check_reading("fruiting", 24.2, 85, 800))
    for _ in range(130):     # spawning repeats the same values for > 10 min
        clock.t += 5
        e.check_reading("spawning", 28.1, 70, 900)
        e.check_reading("fruiting", 24.2 + (_ % 2) / 10, 85, 800)
    assert ("spawning", "sensor_stale", "raised") in kinds(e.check_stale())
