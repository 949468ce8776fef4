"""The grower app's local API (CONTRACT §10) over real HTTP: the dashboard process serving it,
a real reader on a simulated board's pty, the store between them. The oracle is the app's
own parsing (``AppClient``, after MASH-Grower-Mobile's ``device_connection_service.dart``
and ``analytics_screen.dart``): what the app would throw on, this client throws on."""
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import requests

from mash.clock import iso
from mash.config import ConfigError
from mash.models import Store
from mash.simulator import SimulatedBoard
from tests.services import ROOT, Dashboard, free_port, lan_pair_or_skip, stop_process, wait_for

# DateTime.parse's grammar (Dart): date, 'T' or ' ', time, fraction, optional zone
DART_DATETIME = re.compile(r"^\d{4}-\d\d-\d\d[T ]\d\d:\d\d(:\d\d(\.\d{1,6})?)?(Z|[+-]\d\d(:?\d\d)?)?$")


class AppError(Exception):
    """What makes the app's call return null / false (it catches and logs)."""


def num(v):
    """Dart's ``(json[k] ?? 0).toDouble()``: null is 0, a number is taken, anything else throws."""
    if v is None:
        return 0.0
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise AppError(f"{v!r} is not a num")
    return float(v)


class AppClient:
    """The app's DeviceConnectionService: ``http://ip:port/api``, 5 s connect / 10 s receive,
    a call counts only with status 200 and ``success == true``."""

    def __init__(self, base: str):
        self.base = base.rstrip("/") + "/api"

    def _data(self, resp):
        if resp.status_code != 200 or resp.json().get("success") is not True:
            raise AppError(f"{resp.status_code}: {resp.text[:200]}")
        return resp.json()["data"]

    def get(self, path):
        return self._data(requests.get(self.base + path, timeout=(5, 10)))

    def post(self, path, body=None):
        return self._data(requests.post(self.base + path, json=body, timeout=(5, 10)))

    # -- the app's methods ----------------------------------------------------------------
    def connect(self) -> str:
        return self.get("/status")["deviceId"] or "unknown"

    def sensor_data(self) -> dict:
        """DeviceSensorData.fromJson."""
        j = self.get("/sensor/current")
        mode = j.get("mode") if j.get("mode") is not None else "s"
        if not isinstance(mode, str):
            raise AppError("mode is not a String")
        actuators = j.get("actuators") or {}
        if not all(isinstance(k, str) and isinstance(v, bool) for k, v in actuators.items()):
            raise AppError("actuators is not a Map<String, bool>")
        if j.get("timestamp") is not None and not DART_DATETIME.match(j["timestamp"]):
            raise AppError(f"DateTime.parse({j['timestamp']!r}) throws")
        return {"temperature": num(j.get("temperature")), "humidity": num(j.get("humidity")),
                "co2": num(j.get("co2")), "mode": mode, "actuators": actuators,
                "timestamp": j.get("timestamp")}

    def set_mode(self, mode) -> bool:
        return self.post("/mode", {"mode": mode}) is not None

    def control_actuator(self, actuator, state) -> bool:
        return self.post("/actuator", {"actuator": actuator, "state": state}) is not None

    def actuator_states(self) -> dict:
        return self.get("/actuators")

    def automation_status(self) -> dict:
        return self.get("/automation/status")

    def automation_history(self, limit=10) -> list:
        return self.get(f"/automation/history?limit={limit}")["history"]

    def sensor_logs(self, hours=24, limit=100) -> list:
        rows = self.get(f"/logs/sensors?hours={hours}&limit={limit}")["readings"]
        for r in rows:                 # the analytics screen's sensor card
            assert r["mode"] in ("s", "f") and DART_DATETIME.match(r["timestamp"])
            num(r["co2"]), num(r["temperature"]), num(r["humidity"])
        return rows

    def actuator_logs(self, hours=24, limit=50) -> list:
        rows = self.get(f"/logs/actuators?hours={hours}&limit={limit}")["history"]
        for r in rows:                 # log['exhaust_fan'] == 1 ...
            assert all(r[k] in (0, 1) and not isinstance(r[k], bool)
                       for k in ("exhaust_fan", "blower_fan", "humidifier", "led_lights"))
            assert DART_DATETIME.match(r["timestamp"]) and isinstance(r["triggered_by"], str)
        return rows

    def decisions(self, hours=24, limit=20) -> list:
        rows = self.get(f"/logs/ai-decisions?hours={hours}&limit={limit}")["decisions"]
        for d in rows:                 # actions as Map<String, dynamic>, each value `as bool`
            assert all(isinstance(v, bool) for v in d["actions"].values())
            assert isinstance(d["reasoning"], list) and isinstance(d["mode"], str)
        return rows

    def statistics(self, hours=24) -> dict:
        s = self.get(f"/logs/statistics?hours={hours}")
        for k in ("co2", "temperature", "humidity"):
            avg = s["sensor_readings"][k]["avg"]
            assert avg is None or isinstance(avg, (int, float))      # ?.toStringAsFixed
        usage = s["actuator_usage"]
        assert all(type(usage[k]) is int for k in ("exhaust_fan", "blower_fan", "humidifier",
                                                   "led_lights"))      # `as int`
        assert type(s["ai_decisions_count"]) is int
        return s


@pytest.fixture
def phone_stack(tmp_path):
    """A simulated board, reader.py on its pty and ``mash dashboard`` with the phone API on
    a free loopback port; ``start(**env)`` starts the dashboard with those settings."""
    data = tmp_path / "data"
    board = SimulatedBoard(interval=0.3, link=tmp_path / "ttyMASH", seed=5).start(banner=False)
    env = {**os.environ, "MASH_DATA_DIR": str(data), "SERIAL_PORT": board.port,
           "MASH_SIMULATED_BOARD": "1", "PYTHONPATH": str(ROOT), "MDNS": "0",
           "PHONE_API_HOST": "127.0.0.1", "DEVICE_NAME": "Shed 2"}
    log = open(tmp_path / "reader.log", "ab")
    reader = subprocess.Popen([sys.executable, str(ROOT / "reader.py")], env=env,
                              cwd=str(tmp_path), stdout=log, stderr=log)
    started = []

    class Stack:
        pass
    stack = Stack()
    stack.board, stack.store = board, None

    def start(**extra):
        port = free_port()
        dash = Dashboard(tmp_path / f"dash{len(started)}",
                         {**env, "PHONE_API_PORT": str(port), **extra})
        started.append(dash.start())
        if extra.get("PHONE_API") != "off":
            wait_for(lambda: _listening(port), timeout=20, what="the phone API")
        dash.app = AppClient(f"http://127.0.0.1:{port}")
        dash.phone_port = port
        return dash
    stack.start = start
    try:
        wait_for(lambda: (data / "mash.db").exists(), timeout=20, what="the store")
        stack.store = Store(data / "mash.db")
        wait_for(lambda: stack.store.last_reading_id() > 2, timeout=20, what="readings")
        yield stack
    finally:
        for d in started:
            d.stop()
        reader.send_signal(signal.SIGTERM)
        stop_process(reader, timeout=20)
        board.stop()
        log.close()
    for d in started:
        assert "Traceback" not in d.logs(), d.logs()[-3000:]


def _listening(port) -> bool:
    import socket
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
        return True
    except OSError:
        return False


def latest(store, room):
    S = store.m.SensorData
    return S.select().where(S.room == room).order_by(S.id.desc()).limit(1).first()


def answers_latest(app, store, room) -> bool:
    """/sensor/current is the store's latest reading of ``room`` (asked again when one
    landed in between)."""
    d, row = app.sensor_data(), latest(store, room)
    return d["timestamp"] == iso(row.timestamp) and (d["temperature"], d["humidity"], d["co2"]) \
        == (row.temperature, row.humidity, row.co2)


def test_phone_every_route_as_the_app_reads_it_and_control_moves_the_relays(phone_stack):
    stack = phone_stack
    dash = stack.start(PHONE_API="control", CONTROL_MODE="auto")
    app, store, board = dash.app, stack.store, stack.board
    assert app.connect() == "rpi_gateway_001"
    assert app.get("/status")["deviceName"] == "Shed 2"

    # /sensor/current follows the latest reading of the room in mode (fruiting by default)
    first = app.sensor_data()
    assert first["mode"] == "f" and set(first["actuators"]) == {
        "exhaust_fan", "humidifier", "blower_fan", "led_lights"}
    wait_for(lambda: app.sensor_data()["timestamp"] != first["timestamp"], timeout=10,
             what="a newer reading")
    wait_for(lambda: answers_latest(app, store, "fruiting"), timeout=5,
             what="the answer to be the store's latest fruiting reading")

    # climate control ran while in auto; the app turns it off (a CONFIGURE in the ledger)
    wait_for(lambda: app.decisions(), timeout=15, what="a climate-control decision")
    decision = app.automation_history(limit=5)[0]
    assert decision["sensor_data"] and DART_DATETIME.match(decision["timestamp"])
    assert app.automation_status()["enabled"] is True
    assert app.post("/automation/disable")["enabled"] is False
    assert app.automation_status()["enabled"] is False
    assert store.meta_get("configuration")["mode"] == {"fruiting": "manual", "spawning": "manual"}

    # a relay from the app: a set_actuator in the ledger (source local), the board moves
    before = {c.command_id for c in store.m.Command.select()}
    assert app.control_actuator("blower_fan", True)
    wait_for(lambda: board.actuators["FRUITING_INTAKE_FAN"] == "ON", timeout=10, what="intake fan on")
    assert app.control_actuator("humidifier", True)       # the mist cycle: mist and its fan
    wait_for(lambda: board.actuators["MIST_MAKER"] == "ON" and board.actuators["HUMIDIFIER_FAN"] == "ON",
             timeout=10, what="mist on")
    wait_for(lambda: app.actuator_states()["humidifier"] and app.actuator_states()["blower_fan"],
             timeout=10, what="the relays' states read back")
    assert app.control_actuator("humidifier", False)
    wait_for(lambda: board.actuators["MIST_MAKER"] == "OFF" and board.actuators["HUMIDIFIER_FAN"] == "OFF",
             timeout=10, what="mist off")
    C = store.m.Command
    ours = [c for c in C.select().where(C.source == "local") if c.command_id not in before]
    assert sorted(json.loads(c.parameters)["actuator"] for c in ours) == [
        "FRUITING_INTAKE_FAN", "HUMIDIFIER_FAN", "HUMIDIFIER_FAN", "MIST_MAKER", "MIST_MAKER"]
    assert {c.command for c in ours} == {"set_actuator"}

    # mode "s": the spawning room, whose exhaust is exhaust_fan
    assert app.set_mode("s")
    assert app.sensor_data()["mode"] == "s"
    wait_for(lambda: answers_latest(app, store, "spawning"), timeout=5, what="spawning values")
    assert app.control_actuator("exhaust_fan", True)
    wait_for(lambda: board.actuators["SPAWNING_EXHAUST_FAN"] == "ON", timeout=10, what="spawning exhaust")
    assert app.set_mode("f")

    # the logs and statistics the analytics screen reads
    rows = app.sensor_logs(limit=6)
    assert len(rows) == 6 and {r["mode"] for r in rows} == {"f", "s"}
    assert rows[0]["timestamp"] >= rows[-1]["timestamp"]                 # newest first
    history = wait_for(lambda: [h for h in app.actuator_logs(limit=500) if h["source"] == "local"],
                       timeout=10, what="the app's switches in the relay log")
    assert any(h["blower_fan"] == 1 and h["triggered_by"] == "manual" for h in history)
    stats = app.statistics()
    assert stats["actuator_usage"]["blower_fan"] >= 1 and stats["actuator_usage"]["humidifier"] >= 1
    assert stats["ai_decisions_count"] >= 1 and stats["sensor_readings"]["co2"]["avg"] > 0

    # bad input: 400 with the reason; no second door: reboot and update do not exist here
    for body, word in (({"actuator": "kettle", "state": True}, "actuator"),
                       ({"actuator": "led_lights", "state": "ON"}, "true or false")):
        r = requests.post(app.base + "/actuator", json=body, timeout=10)
        assert r.status_code == 400 and word in r.json()["error"] and r.json()["success"] is False
    assert requests.post(app.base + "/mode", json={"mode": "x"}, timeout=10).status_code == 400
    assert requests.get(app.base + "/logs/sensors?hours=many", timeout=10).status_code == 400
    for path in ("/system/reboot", "/update", "/settings", "/wifi/connect"):
        assert requests.post(app.base + path, json={}, timeout=10).status_code == 404
    # a web page on the LAN (it sends Origin) cannot drive the relays; nor a rebinding Host
    r = requests.post(app.base + "/actuator", json={"actuator": "led_lights", "state": True},
                      headers={"Origin": "http://evil.example"}, timeout=10)
    assert r.status_code == 403
    r = requests.get(app.base + "/status", headers={"Host": "evil.example:5000"}, timeout=10)
    assert r.status_code == 403

    assert app.post("/automation/enable")["enabled"] is True
    # rate-limited: 20 writes a minute per client, then 429
    codes = [requests.post(app.base + "/mode", json={"mode": "f"}, timeout=10).status_code
             for _ in range(25)]
    assert 429 in codes and codes.index(429) <= 20 and set(codes) == {200, 429}


def test_phone_read_refuses_writes_and_off_serves_nothing(phone_stack):
    stack = phone_stack
    dash = stack.start(PHONE_API="read")
    app = dash.app
    assert app.connect() == "rpi_gateway_001" and app.sensor_data()["mode"] == "f"
    before = stack.store.m.Command.select().count()
    for path, body in (("/actuator", {"actuator": "led_lights", "state": True}),
                       ("/mode", {"mode": "s"}), ("/automation/disable", None)):
        r = requests.post(app.base + path, json=body, timeout=10)
        assert r.status_code == 403 and "PHONE_API=control" in r.json()["error"]
    assert stack.store.m.Command.select().where(
        stack.store.m.Command.source == "local").count() == 0
    assert stack.store.m.Command.select().count() >= before
    dash.stop()
    off = stack.start(PHONE_API="off")
    assert not _listening(off.phone_port)
    assert "phone API: off" in off.logs()


def test_phone_refuses_commands_from_outside_the_private_subnets(tmp_path):
    """Inside two namespaces: the same phone, from its private address and from its
    carrier-grade-NAT one (on the link, but not private): the first is taken, the second
    refused, and only the first reaches the ledger."""
    lan = lan_pair_or_skip()
    data = tmp_path / "data"
    env = {**os.environ, "MASH_DATA_DIR": str(data), "MDNS": "0", "PHONE_API": "control",
           "PHONE_API_HOST": "0.0.0.0", "PHONE_API_PORT": "5000"}
    log = open(tmp_path / "dashboard.log", "ab")
    gateway = lan.popen(lan.gw, ["-m", "mash.dashboard"], env, stdout=log, stderr=log)
    peer = str(ROOT / "tests" / "lan_peer.py")
    try:
        lan.wait_port(lan.ph, lan.GW, 5000)
        results = {}
        for source in (lan.PHONE, lan.PHONE_SHARED):
            target = lan.GW if source == lan.PHONE else lan.GW_SHARED
            done = lan.run(lan.ph, [peer, "post", source, f"http://{target}:5000/api/actuator",
                                    json.dumps({"actuator": "led_lights", "state": True})])
            assert done.returncode == 0, done.stderr
            results[source] = json.loads(done.stdout)
        assert results[lan.PHONE]["status"] == 200 and results[lan.PHONE]["body"]["success"]
        refused = results[lan.PHONE_SHARED]
        assert refused["status"] == 403 and "private network" in refused["body"]["error"]
        C = Store(data / "mash.db").m.Command
        rows = list(C.select().where(C.source == "local"))
        assert [json.loads(c.parameters) for c in rows] == [{"actuator": "FRUITING_LED", "state": "ON"}]
    finally:
        stop_process(gateway)
        lan.stop()
        log.close()
    text = (tmp_path / "dashboard.log").read_text()
    assert "refused a command from 100.64.77.2" in text and "Traceback" not in text


@pytest.mark.parametrize("env, key", [({"PHONE_API": "write"}, "PHONE_API"),
                                      ({"PHONE_API_HOST": "phone.example"}, "PHONE_API_HOST"),
                                      ({"PHONE_API_PORT": "70000"}, "PHONE_API_PORT"),
                                      ({"MDNS": "maybe"}, "MDNS")])
def test_phone_settings_refuse_a_bad_value_naming_the_key(make_settings, env, key):
    with pytest.raises(ConfigError) as exc:
        make_settings(**env)
    assert exc.value.key == key
    s = make_settings()
    assert (s.mdns, s.phone_api, s.phone_api_host, s.phone_api_port) == (True, "read", "0.0.0.0", 5000)


def test_phone_port_taken_dashboard_goes_on_without_it(tmp_path, data_dir):
    """Port 5000 held by another program: the dashboard says why and serves on."""
    import socket
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        dash = Dashboard(tmp_path / "dash", {**os.environ, "MASH_DATA_DIR": str(data_dir),
                                             "PHONE_API": "read", "PHONE_API_HOST": "127.0.0.1",
                                             "PHONE_API_PORT": str(holder.getsockname()[1])})
        dash.start()
        try:
            assert requests.get(dash.url + "/login", timeout=10).status_code in (200, 302)
            assert "phone API: cannot listen on 127.0.0.1" in dash.logs()
            page = requests.get(dash.url + "/pair", timeout=10).text     # loopback, no password
            assert "not running: its port could not be had" in page
        finally:
            dash.stop()
    finally:
        holder.close()
