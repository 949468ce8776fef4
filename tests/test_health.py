"""``mash.health.snapshot``: the figures from /sys and /proc (a fake root here), the Pi's
under-voltage flag from vcgencmd's bits, None for what a machine does not have; and the
dashboard's state carries them."""
from mash import __version__, health
from mash.dashboard import data


def fake_root(tmp_path, temp="48312", meminfo="MemTotal: 1000 kB\nMemAvailable: 250 kB\n"):
    (tmp_path / "sys/class/thermal/thermal_zone0").mkdir(parents=True)
    (tmp_path / "sys/class/thermal/thermal_zone0/temp").write_text(temp + "\n")
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text(meminfo)
    (tmp_path / "proc/uptime").write_text("3600.52 7000.00\n")
    return tmp_path


def test_health_snapshot_reads_the_machines_figures(tmp_path):
    root = fake_root(tmp_path / "root")
    h = health.snapshot(tmp_path, started=1000.0, now=1090.0, root=root, throttled_flags=0x50005)
    assert h["version"] == __version__ and h["uptime_s"] == 90
    assert h["cpu_temp_c"] == 48.3 and h["memory_used_pct"] == 75.0
    assert h["system_uptime_s"] == 3601 and 0 < h["disk_used_pct"] <= 100
    assert h["under_voltage"] is True
    assert health.snapshot(tmp_path, 0, root=root, throttled_flags=0)["under_voltage"] is False


def test_health_snapshot_without_the_figures_says_none(tmp_path):
    h = health.snapshot(tmp_path / "nowhere", started=0, root=tmp_path / "empty")
    assert h["cpu_temp_c"] is None and h["memory_used_pct"] is None
    assert h["under_voltage"] is None and h["system_uptime_s"] is None


def test_health_in_the_dashboards_state(make_settings, store):
    state = data.snapshot(make_settings(), store)
    assert state["health"]["version"] == __version__
    assert "disk_used_pct" in state["health"]


def test_health_in_firebase_metadata():
    from mash.sinks.firebase import status_object
    figures = {"version": __version__, "cpu_temp_c": 51.0}
    assert status_object("ONLINE", {"health": figures})["metadata"]["health"] == figures
