"""The MQTT client against a real mosquitto with TLS and a password file."""
import signal
import subprocess
import sys
import time

import pytest

from mash.sinks.mqtt_client import MQTTClient, create_mqtt_client
from tests.services import make_ca, wait_for

DEVICE = "rpi_gateway_001"


@pytest.fixture
def mqtt_for(make_settings):
    clients = []
    def make(broker, **env):
        c = MQTTClient(make_settings(**{**broker.env(), **env}))
        clients.append(c)
        return c
    yield make
    for c in clients:
        c.disconnect()


def test_guide_example_publishes_and_receives_commands(broker, observer, mqtt_for):
    mqtt = mqtt_for(broker)
    assert mqtt.connect()
    assert mqtt.is_alive()
    received = []
    mqtt.set_command_callback(received.append)
    confirmed = []
    mqtt.publish_sensor_data({"fruiting": {"temp": 24.5, "humidity": 85, "co2": 800}},
                             reading_id="r-1", on_confirm=lambda: confirmed.append("sensor"))
    mqtt.publish_alert("high_temp", "Temperature critical", "CRITICAL", room="fruiting",
                       on_confirm=lambda: confirmed.append("alert"))
    wait_for(lambda: len(confirmed) == 2, what="PUBACKs")
    cmd = {"id": "cmd-1", "command": "set_actuator",
           "parameters": {"actuator": "MIST_MAKER", "state": "ON"}}
    observer.publish(f"devices/{DEVICE}/commands", cmd)
    wait_for(lambda: received, what="command callback")
    assert received == [cmd]
    data = wait_for(lambda: observer.on("/sensor_data"), what="sensor data")[0]
    assert data["deviceId"] == DEVICE and data["readingId"] == "r-1"
    assert data["fruiting"] == {"temp": 24.5, "humidity": 85, "co2": 800}
    alert = wait_for(lambda: observer.on("/alerts"), what="alert")[0]
    assert {"id", "type", "message", "severity", "room", "timestamp"} <= set(alert)
    status = wait_for(lambda: observer.on("/status"), what="status")[-1]
    assert status["status"] == "online"


def test_create_mqtt_client_without_a_broker_is_off(make_settings):
    mqtt = create_mqtt_client(make_settings())
    assert not mqtt.enabled and mqtt.connect() is False and not mqtt.is_alive()


def test_wrong_ca_is_refused(broker, mqtt_for, tmp_path):
    other = make_ca(tmp_path / "other", "Some other CA")
    mqtt = mqtt_for(broker, MQTT_CA_CERTS=str(other["ca"]))
    assert mqtt.connect(timeout=3) is False


def test_bad_password_is_refused(broker, mqtt_for):
    mqtt = mqtt_for(broker, MQTT_PASSWORD="not-the-password", DEVICE_ID="badpw")
    assert mqtt.connect(timeout=3) is False
    assert mqtt.last_error in ("Not authorized", "Bad user name or password")


def test_client_reconnects_by_itself_after_broker_kill_9(fresh_broker, mqtt_for):
    mqtt = mqtt_for(fresh_broker)
    received = []
    mqtt.set_command_callback(received.append)
    assert mqtt.connect()
    fresh_broker.kill()
    wait_for(lambda: not mqtt.is_alive(), what="offline noticed")
    fresh_broker.start()
    t0 = time.monotonic()
    wait_for(lambda: mqtt.is_alive(), timeout=40, what="reconnected")
    print(f"reconnected {time.monotonic() - t0:.1f} s after the broker came back")
    obs = fresh_broker.observer()
    try:
        obs.publish(f"devices/{DEVICE}/commands", {"id": "after-restart", "command": "REQUEST_STATUS"})
        wait_for(lambda: received, what="command after restart")
        assert received[0]["id"] == "after-restart"
    finally:
        obs.close()


def test_connects_later_when_the_broker_is_down_at_boot(tmp_path, make_settings):
    from tests.services import Broker
    broker = Broker(tmp_path / "late")
    mqtt = MQTTClient(make_settings(**broker.env()))
    try:
        assert mqtt.connect(timeout=1) is False
        broker.start()
        wait_for(mqtt.is_alive, timeout=40, what="came up by itself")
    finally:
        mqtt.disconnect()
        broker.stop()


KILLED_CLIENT = """
import sys, time
from mash.config import Settings
from mash.sinks.mqtt_client import MQTTClient
c = MQTTClient(Settings.from_mapping(dict(a.split("=", 1) for a in sys.argv[1:])))
assert c.connect(10)
print("up", flush=True)
time.sleep(60)
"""


def test_observer_sees_retained_offline_when_the_gateway_dies(broker, observer, tmp_path):
    args = [f"{k}={v}" for k, v in broker.env().items()] + ["DEVICE_ID=dying_gateway",
                                                            f"MASH_DATA_DIR={tmp_path}"]
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, *args], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        wait_for(lambda: [m for m in observer.on("dying_gateway/status") if m["status"] == "online"],
                 what="online status")
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
    finally:
        if proc.poll() is None:
            proc.kill()
    # keepalive 30 s: the broker notices the dead socket at once (RST), so the will is prompt
    wait_for(lambda: observer.on("dying_gateway/status")[-1]["status"] == "offline", timeout=60,
             what="last will")
    late = broker.observer(topics=("devices/dying_gateway/status",))
    try:
        msg = wait_for(lambda: late.messages, what="retained status")[0]
        assert msg[2] is True and msg[1] == {"deviceId": "dying_gateway", "status": "offline"}
    finally:
        late.close()


def test_messages_on_other_topics_are_never_acted_on(broker, mqtt_for):
    mqtt = mqtt_for(broker)
    got = []
    mqtt.set_command_callback(got.append)
    assert mqtt.connect()
    mqtt.client.subscribe("devices/other_gateway/commands", qos=1)   # even if subscribed by mistake
    obs = broker.observer()
    try:
        obs.publish("devices/other_gateway/commands", {"id": "x", "command": "REQUEST_STATUS"})
        wait_for(lambda: mqtt.rejected == 1, what="rejection counted")
        assert got == []
    finally:
        obs.close()


def test_clean_disconnect_leaves_retained_offline(broker, observer, mqtt_for):
    mqtt = mqtt_for(broker, DEVICE_ID="clean_gw")
    assert mqtt.connect()
    mqtt.disconnect()
    wait_for(lambda: observer.on("clean_gw/status") and observer.on("clean_gw/status")[-1]["status"] == "offline",
             what="offline status")


def test_reconnect_waits_are_full_jitter_and_reset_only_after_a_connection_held_60_s():
    import random
    import statistics

    from mash.sinks.mqtt_client import Reconnects

    now = [0.0]
    random.seed(20)                       # tenacity draws from the module's random source
    waits = Reconnects(first=1.0, cap=30.0, held=60.0, clock=lambda: now[0])
    # past the cap (attempt 6: 32 s > 30 s) every wait is uniform in [0, 30]
    draws = []
    for _ in range(2000):
        waits.attempt = 10
        draws.append(waits.next_delay())
    assert 0.0 <= min(draws) < 1.0 and 29.0 < max(draws) <= 30.0
    assert 13.5 < statistics.mean(draws) < 16.5, statistics.mean(draws)
    spread = sorted(draws)
    assert spread[1900] - spread[100] > 25, "5th to 95th percentile spans most of the window"
    # the window doubles per attempt: the third attempt waits at most 4 s
    fresh = Reconnects(first=1.0, cap=30.0, clock=lambda: now[0])
    assert [fresh.next_delay() <= bound for bound in (1, 2, 4)] == [True] * 3
    # a connection dropped after 10 s keeps the count; one held 60 s resets it
    fresh.connected()
    now[0] += 10
    fresh.next_delay()
    assert fresh.attempt == 4
    fresh.connected()
    now[0] += 60
    fresh.next_delay()
    assert fresh.attempt == 1
