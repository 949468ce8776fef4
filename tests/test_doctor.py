"""``mash doctor`` against the real stack (simulated board on a pty, reader.py, worker.py,
the devserver, mosquitto with TLS and a password, the RTDB stand-in): all pass when healthy,
and each broken part gives exactly its own ✗."""
import json

import pytest

from tests.services import Broker, make_ca, wait_for, whole_stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    base = tmp_path_factory.mktemp("doctor")
    # a MASH serial: any other DEVICE_ID is a warning (tests/test_firebase_apps.py)
    with whole_stack(base, interval=0.2, CLOCK_SYNC="auto", DEVICE_ID="MASH-B2-CAL26-CE637C") as gw:
        status = lambda: json.loads(gw.mash("status", "--json").stdout or "{}")   # noqa: E731
        wait_for(lambda: status().get("processes", {}).get("worker", {}).get("alive")
                 and status().get("mqtt_online") and status().get("total_synced"),
                 timeout=60, interval=0.5, what="the gateway up and syncing")
        gw.other_ca = make_ca(base / "other-ca", name="Not the broker's CA")
        gw.stopped = Broker(base / "stopped-broker").start()
        gw.stopped.stop()
        yield gw


def doctor(gw, **env):
    gw_env = gw.env
    try:
        gw.env = {**gw_env, **env}
        result = gw.mash("doctor", "--json", timeout=120)
    finally:
        gw.env = gw_env
    assert result.returncode in (0, 1), result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] == (result.returncode == 0)
    return report


def failed(report):
    return {c["check"] for c in report["checks"] if c["ok"] is False}


def test_doctor_passes_on_a_healthy_stack(stack):
    report = doctor(stack)
    assert failed(report) == set(), json.dumps(report, indent=1)
    names = [c["check"] for c in report["checks"]]
    assert names[:5] == ["configuration", "serial port", "serial access", "serial holder", "serial reading"]
    assert {"clock", "store integrity", "backend login", "backend device", "mqtt tls", "mqtt auth",
            "mqtt subscribe", "firebase read", "reader", "worker", "backlog", "device serial"} <= set(names)
    holder = next(c for c in report["checks"] if c["check"] == "serial holder")
    assert "held by the reader" in holder["detail"]
    # mDNS is off in the tests' stacks (tests/conftest.py), and never a failure; its line
    # while the dashboard advertises is checked in tests/test_mdns.py
    mdns = next(c for c in report["checks"] if c["check"] == "mDNS")
    assert mdns["ok"] is None and mdns["detail"] == "off (MDNS=0)"
    assert all(c["ok"] is True for c in report["checks"] if c["check"] != "mDNS"), \
        "every part configured and checked"


@pytest.mark.parametrize("case, env, expected", [
    ("wrong password", {"MQTT_PASSWORD": "not-the-password"}, {"mqtt auth"}),
    ("wrong CA", "other_ca", {"mqtt tls"}),
    ("stopped broker", "stopped", {"mqtt tls"}),
    ("missing port", {"SERIAL_PORT": "/dev/ttyACM-missing"}, {"serial port"}),
    ("wrong device password", {"DEVICE_PASSWORD": "nope"}, {"backend login"}),
    ("readable .env", "open_env", {"file modes"}),
])
def test_each_broken_part_gives_exactly_its_own_cross(stack, case, env, expected):
    if env == "other_ca":
        env = {"MQTT_CA_CERTS": str(stack.other_ca["ca"])}
    elif env == "stopped":
        env = {"MQTT_PORT": str(stack.stopped.port)}
    elif env == "open_env":
        path = stack.dir / "open.env"
        path.write_text("LOG_LEVEL=INFO\n")
        path.chmod(0o644)
        env = {"MASH_ENV_FILE": str(path)}
    report = doctor(stack, **env)
    assert failed(report) == expected, json.dumps(report, indent=1)
    bad = next(c for c in report["checks"] if c["check"] in expected)
    assert bad["fix"], "a failure says how to fix it"
    if case == "stopped broker":
        assert "cannot reach the broker" in bad["detail"]
    if case == "readable .env":
        assert bad["fix"] == f"chmod 600 {stack.dir / 'open.env'}"
