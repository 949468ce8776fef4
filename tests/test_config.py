import pytest

from mash.config import ConfigError, Settings


def test_defaults_follow_the_contract():
    s = Settings.from_mapping({})
    assert (s.sync_interval, s.batch_size, s.mqtt_port, s.serial_baud, s.mqtt_qos) == (60, 50, 8883, 9600, 1)
    assert not s.backend_enabled and not s.mqtt_enabled and not s.firebase_enabled
    assert s.thresholds["fruiting"]["temp_min"] == 22.0


@pytest.mark.parametrize("env,key", [
    ({"BATCH_SIZE": "abc"}, "BATCH_SIZE"),
    ({"BATCH_SIZE": "1001"}, "BATCH_SIZE"),          # the backend takes at most 1000 a request
    ({"SYNC_INTERVAL": "0"}, "SYNC_INTERVAL"),
    ({"MQTT_PORT": "99999"}, "MQTT_PORT"),
    ({"MQTT_QOS": "2"}, "MQTT_QOS"),
    ({"ALERT_THRESHOLDS": '{"cellar":{"temp_max":20}}'}, "ALERT_THRESHOLDS"),
    ({"ALERT_THRESHOLDS": '{"fruiting":{"temp_max":"hot"}}'}, "ALERT_THRESHOLDS"),
    ({"BACKEND_URL": "http://api.mashmarket.app"}, "BACKEND_URL"),
    ({"DEVICE_ID": "a/b"}, "DEVICE_ID"),
    ({"SERIAL_BAUD": "1234"}, "SERIAL_BAUD"),
    ({"MQTT_CA_CERTS": "/nonexistent/ca.pem"}, "MQTT_CA_CERTS"),
])
def test_bad_values_name_the_key(env, key):
    with pytest.raises(ConfigError) as err:
        Settings.from_mapping(env)
    assert err.value.key == key
    assert key in str(err.value) and "\n" not in str(err.value)


def test_batch_size_is_capped_at_what_the_backend_takes():
    from mash.contract import MAX_READINGS_PER_REQUEST
    assert MAX_READINGS_PER_REQUEST == 1000
    assert Settings.from_mapping({"BATCH_SIZE": "1000"}).batch_size == 1000
    with pytest.raises(ConfigError, match="between 1 and 1000"):
        Settings.from_mapping({"BATCH_SIZE": "5000"})


def test_backend_url_gets_api_prefix_only_without_a_path():
    assert Settings.from_mapping({"BACKEND_URL": "https://api.mashmarket.app"}).api_base == \
        "https://api.mashmarket.app/api/v1"
    assert Settings.from_mapping({"BACKEND_URL": "https://x.example/v2/"}).api_base == "https://x.example/v2"
    assert Settings.from_mapping({"BACKEND_URL": "http://127.0.0.1:3000"}).api_base == "http://127.0.0.1:3000/api/v1"
    assert Settings.from_mapping({"BACKEND_URL": "http://farm.lan", "BACKEND_ALLOW_INSECURE": "1"}).backend_url


def test_password_never_in_the_error_line():
    with pytest.raises(ConfigError) as err:
        Settings.from_mapping({"MQTT_PASSWORD": "hunter2", "MQTT_PORT": "x"})
    assert "hunter2" not in str(err.value)
