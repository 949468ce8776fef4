"""A full client session logged at DEBUG: no password or token appears anywhere."""
import logging
import time

from mash.sinks.backend_api import BackendAPIClient
from mash.sinks.firebase import FirebaseSync
from mash.sinks.mqtt_client import MQTTClient


def test_debug_logs_of_a_full_session_hold_no_secret(devserver_factory, broker, rtdb, make_settings, caplog):
    server = devserver_factory(access_ttl=2, refresh_ttl=4)
    settings = make_settings(**server.env(), **broker.env(),
                             FIREBASE_DATABASE_URL="https://mash-test.firebaseio.com",
                             FIREBASE_CREDENTIALS=str(rtdb.credentials))
    tokens = set()
    caplog.set_level(logging.DEBUG)
    backend = BackendAPIClient(settings)
    mqtt = MQTTClient(settings)
    try:
        backend.register_device()
        tokens |= {backend._access, backend._refresh}
        for i in range(2):                       # two refreshes (access tokens live 2 s)
            time.sleep(1.6)
            backend.update_status("ONLINE", {"i": i})
            tokens |= {backend._access, backend._refresh}
        time.sleep(6)                            # the refresh token (4 s, exp rounded up) dies
        backend.update_status("ONLINE", {"i": 2})
        tokens |= {backend._access, backend._refresh}
        backend.upload_readings([{"id": "s1", "room": "fruiting", "temperature": 24.0, "humidity": 85.0,
                                  "co2": 800, "timestamp": "2026-01-28T10:00:00.000Z"}], "k")
        server.faults(fail_next=1)
        backend.get_actuator_commands()
        assert mqtt.connect()
        mqtt.publish_sensor_data({"fruiting": {"temp": 24}})
        mqtt.publish_alert("high_co2", "x", "CRITICAL")
        fb = FirebaseSync(settings)
        fb.sync_sensor_readings([{"room": "fruiting", "temp": 1, "humidity": 2, "co2": 3, "key": "k"}])
        BackendAPIClient(settings.with_(device_password="wrong-password-123")).authenticate()
    finally:
        mqtt.disconnect()
        backend.close()
    text = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert len(tokens - {None}) >= 4
    assert "logging in again" in text and "MQTT connected" in text and "Sending CONNECT" in text
    for secret in [server.PASSWORD, broker.PASSWORD, "wrong-password-123", *tokens - {None}]:
        assert secret not in text
    for token in tokens - {None}:
        for part in token.split("."):
            assert part not in text
