"""firebase-admin itself against the RTDB REST stand-in (FIREBASE_DATABASE_EMULATOR_HOST)."""
import datetime as dt

from mash.sinks.firebase import FirebaseSync, create_firebase_sync, reading_key


def fb(make_settings, rtdb, **env):
    return FirebaseSync(make_settings(**{"FIREBASE_DATABASE_URL": "https://mash-test.firebaseio.com",
                                         "FIREBASE_CREDENTIALS": str(rtdb.credentials), **env}))


def test_guide_example_writes_the_guide_tree(make_settings, rtdb):
    firebase = fb(make_settings, rtdb)
    assert firebase.is_initialized
    ts = dt.datetime(2026, 1, 28, 10, 0, 0)
    count = firebase.sync_sensor_readings([
        {"room": "fruiting", "temp": 24.5, "humidity": 85, "co2": 800, "timestamp": ts},
        {"room": "spawning", "temp": 27.9, "humidity": 74.1, "co2": 3100, "key": "2026-01-28T10-00-00"},
        {"room": "fruiting", "temp": 24.6, "humidity": 85, "co2": 801, "key": "2026-01-28T10-00-00-1"},
    ])
    assert count == 3
    assert rtdb.tree == {"sensor_data": {
        "fruiting": {"2026-01-28T10-00-00": {"temperature": 24.5, "humidity": 85, "co2": 800},
                     "2026-01-28T10-00-00-1": {"temperature": 24.6, "humidity": 85, "co2": 801}},
        "spawning": {"2026-01-28T10-00-00": {"temperature": 27.9, "humidity": 74.1, "co2": 3100}}}}
    writes = rtdb.writes()
    assert len(writes) == 1 and writes[0][0] == "PATCH"        # a batch is one request


def test_a_batch_sent_twice_overwrites_itself(make_settings, rtdb):
    firebase = fb(make_settings, rtdb)
    batch = [{"room": "fruiting", "temp": 20 + i, "humidity": 80, "co2": 700, "key": f"k{i}"} for i in range(50)]
    assert firebase.sync_sensor_readings(batch) == 50
    assert firebase.sync_sensor_readings(batch) == 50
    assert len(rtdb.tree["sensor_data"]["fruiting"]) == 50
    assert len(rtdb.writes()) == 2


def test_status_and_config(make_settings, rtdb):
    firebase = fb(make_settings, rtdb)
    firebase.update_status({"status": "online", "pending_records": 3})
    assert rtdb.tree["devices"]["rpi_gateway_001"]["status"] == {"status": "online", "pending_records": 3}
    rtdb.tree["devices"]["rpi_gateway_001"]["config"] = {"sync_interval": 30}
    assert firebase.get_config() == {"sync_interval": 30}


def test_unconfigured_or_bad_credentials_is_not_initialized(make_settings, rtdb, tmp_path, caplog):
    assert create_firebase_sync(make_settings()).is_initialized is False
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "service_account", "private_key": "nope"}')
    with caplog.at_level("ERROR"):
        firebase = fb(make_settings, rtdb, FIREBASE_CREDENTIALS=str(bad))
    assert firebase.is_initialized is False
    assert firebase.sync_sensor_readings([{"room": "fruiting", "temp": 1, "humidity": 1, "co2": 1}]) == 0
    assert "Firebase initialization failed" in caplog.text


def test_unreachable_database_counts_zero_not_a_crash(make_settings, rtdb):
    firebase = fb(make_settings, rtdb)
    rtdb.stop()
    assert firebase.sync_sensor_readings([{"room": "fruiting", "temp": 1, "humidity": 1, "co2": 1, "key": "a"}]) == 0


def test_reading_key_is_utc_seconds():
    assert reading_key(dt.datetime(2026, 1, 28, 10, 0, 5)) == "2026-01-28T10-00-05"
    assert reading_key(0) == "1970-01-01T00-00-00"
