"""The backend client against the reference backend, a real subprocess on loopback."""
import subprocess
import sys
import time

import jwt
import pytest

from mash.sinks import errors
from mash.sinks.backend_api import (AuthError, BadRequest, NotFound, PermanentError,
                                    RetryableError, TooLarge, create_backend_client, match_sensors,
                                    unwrap)
from tests.services import wait_for

DEVICE = "rpi_gateway_001"


def reading(rid, **over):
    r = {"id": rid, "room": "fruiting", "temperature": 24.5, "humidity": 85.2, "co2": 812,
         "timestamp": "2026-01-28T10:00:00.000Z"}
    r.update(over)
    return r


def test_guide_example_authenticates_uploads_alerts_and_fetches(devserver, client_for):
    backend = client_for(devserver)
    assert backend.authenticate() is True
    assert backend.access_token is not None
    claims = jwt.decode(backend.access_token, options={"verify_signature": False})
    assert {"sub", "email", "role", "iat", "exp"} <= set(claims)
    assert backend.check_connection()
    assert backend.send_sensor_data({"fruiting": {"temp": 24.5, "humidity": 85, "co2": 800},
                                     "timestamp": time.time()}) is True
    assert backend.send_alert("high_co2", "CO2 exceeded threshold", "CRITICAL") is True
    devserver.issue(DEVICE, "set_actuator", {"actuator": "MIST_MAKER", "state": "ON"})
    commands = backend.get_actuator_commands()
    assert [c["command"] for c in commands] == ["set_actuator"]
    state = devserver.state(DEVICE)
    assert state["readings"] == {DEVICE: 1}
    assert state["alerts"][0]["severity"] == "CRITICAL"


def test_create_backend_client_reads_settings_from_env(devserver, monkeypatch, data_dir):
    for k, v in devserver.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MASH_DATA_DIR", str(data_dir))
    backend = create_backend_client()
    assert backend.base == devserver.url and backend.check_connection()


def test_bad_credentials_are_an_auth_error(devserver, client_for):
    backend = client_for(devserver, DEVICE_PASSWORD="wrong")
    assert backend.authenticate() is False
    assert backend.check_connection() is False
    with pytest.raises(AuthError):
        backend.register_device()


def test_registration_409_means_already_ours(devserver, client_for):
    backend = client_for(devserver)
    first = backend.register_device()
    assert first["serialNumber"] == DEVICE
    assert backend.register_device() == {"serialNumber": DEVICE, "alreadyRegistered": True}


def test_refresh_before_expiry_with_2s_access_tokens(devserver_factory, client_for):
    server = devserver_factory(access_ttl=2, refresh_ttl=60)
    backend = client_for(server)
    backend.register_device()
    first = backend.access_token
    for _ in range(4):
        time.sleep(0.8)
        backend.update_status("ONLINE", {})
    assert backend.access_token != first           # refreshed, never refused
    assert backend._refresh is not None


def test_relogin_when_the_refresh_token_expired(devserver_factory, client_for, caplog):
    server = devserver_factory(access_ttl=1, refresh_ttl=2)
    backend = client_for(server)
    backend.register_device()
    time.sleep(3)                                   # both tokens dead
    with caplog.at_level("INFO", logger="mash.backend"):
        backend.update_status("ONLINE", {})
    assert "logging in again" in caplog.text


def test_401_is_retried_once_after_a_fresh_session(devserver, client_for):
    backend = client_for(devserver)
    backend.register_device()
    backend._access = jwt.encode({"sub": "1", "type": "access", "exp": int(time.time()) + 600},
                                 "not-the-servers-secret-not-the-servers", algorithm="HS256")
    backend._access_exp = time.time() + 600
    assert backend.update_status("ONLINE", {})["status"] == "ONLINE"


def test_429_blocks_every_request_until_retry_after_has_passed(devserver_factory, client_for):
    server = devserver_factory(rate_limit=3, rate_window=2)
    backend = client_for(server)
    backend.register_device()
    t0 = time.monotonic()
    with pytest.raises(RetryableError) as err:
        for _ in range(10):
            backend.get_configuration()
    assert err.value.status == 429 and err.value.retry_after >= 1
    sent = server.state()["requests"]
    with pytest.raises(RetryableError):
        backend.update_status("ONLINE", {})     # blocked locally: nothing is sent
    assert server.state()["requests"] == sent
    while True:
        try:
            backend.get_configuration()
            break
        except RetryableError as exc:
            time.sleep(exc.retry_after or 0.05)
    waited = time.monotonic() - t0
    assert waited >= err.value.retry_after - 0.05
    print(f"429 honoured: asked {err.value.retry_after:.1f} s, next request after {waited:.2f} s")


def test_503_is_retryable_and_400_is_permanent_with_the_message(devserver, client_for):
    backend = client_for(devserver)
    backend.register_device()
    devserver.faults(fail_next=2)
    with pytest.raises(RetryableError) as err:
        backend.upload_readings([reading("r1")], "k1")
    assert err.value.status == 503
    with pytest.raises(PermanentError) as err:
        devserver.faults(fail_next=0)
        backend.upload_readings([reading("r1", room="cellar")], "k2")
    assert err.value.status == 400 and "room must be one of" in str(err.value)
    assert not isinstance(err.value, RetryableError)


def test_an_upload_sent_twice_is_stored_once(devserver, client_for):
    backend = client_for(devserver)
    backend.register_device()
    batch = [reading(f"r{i}") for i in range(5)]
    assert backend.upload_readings(batch, "batch-1") == {"accepted": 5, "duplicates": 0}
    assert backend.upload_readings(batch, "batch-1") == {"accepted": 5, "duplicates": 0}  # replayed key
    assert backend.upload_readings(batch, "batch-2") == {"accepted": 0, "duplicates": 5}
    assert devserver.state()["readings"] == {DEVICE: 5}


def test_network_errors_and_timeouts_are_retryable(devserver, client_for):
    backend = client_for(devserver, BACKEND_TIMEOUT="0.5")
    backend.register_device()
    devserver.faults(latency=1.5)
    with pytest.raises(RetryableError, match="timeout"):
        backend.get_configuration()
    devserver.faults(latency=0, drop_for=2)
    with pytest.raises(RetryableError, match="network error"):
        backend.get_configuration()
    devserver.faults(drop_for=0)
    assert backend.get_configuration() == {}


def test_bare_and_wrapped_bodies_are_both_read(devserver, client_for):
    backend = client_for(devserver)
    backend.register_device()
    devserver.faults(bare=True)
    assert backend.upload_readings([reading("b1")], "kb") == {"accepted": 1, "duplicates": 0}
    assert unwrap({"success": True, "statusCode": 200, "data": {"a": 1}}) == {"a": 1}
    assert unwrap({"a": 1}) == {"a": 1}


def test_plain_http_to_a_remote_host_is_refused(make_settings):
    from mash.config import ConfigError
    with pytest.raises(ConfigError):
        make_settings(BACKEND_URL="http://api.mashmarket.app", DEVICE_EMAIL="a", DEVICE_PASSWORD="b")


def test_a_refused_login_backs_off_and_sends_nothing_until_the_next_attempt(devserver, client_for):
    backend = client_for(devserver)
    backend.login_backoff = (1.0, 4.0)          # 30 s, doubling to 15 min, in production
    backend.register_device()
    devserver.faults(unauthorized_for=2.5)      # a locked account, for 2.5 s
    with pytest.raises(AuthError) as err:
        backend.update_status("ONLINE", {})
    assert isinstance(err.value, RetryableError) and not isinstance(err.value, PermanentError)
    assert 0.5 <= err.value.retry_after <= 1.0 and backend.auth_refused   # 1 s, half drawn
    refused = devserver.state()["faults"]["unauthorized"]
    assert refused == [f"PUT /devices/{DEVICE}", "POST /auth/refresh", "POST /auth/login"]
    sent = devserver.state()["requests"]
    with pytest.raises(AuthError) as err:
        backend.get_configuration()             # inside the backoff: nothing is sent
    assert 0 < err.value.retry_after <= 1.0
    assert devserver.state()["requests"] == sent

    def attempt():
        try:
            return backend.get_configuration() == {}
        except AuthError:
            return False
    wait_for(attempt, timeout=15, interval=0.05, what="a login once the lockout ended")
    # refused again inside the 2.5 s lockout (after 0.5-1 s, then 1-2 s of backoff), and
    # the first login after it works: one or two more refusals, logins only
    later = devserver.state()["faults"]["unauthorized"][3:]
    assert later in (["POST /auth/login"], ["POST /auth/login"] * 2)
    assert not backend.auth_refused and backend.auth_blocked_for == 0


def test_sink_failures_are_classified_in_one_place(devserver, client_for):
    backend = client_for(devserver)
    backend.register_device()
    for status, cls, kind in ((403, AuthError, errors.AUTH), (413, TooLarge, errors.TOO_LARGE),
                              (422, BadRequest, errors.BAD_REQUEST), (404, NotFound, errors.NOT_FOUND),
                              (503, RetryableError, errors.OFFLINE)):
        devserver.faults(fail_next=1, fail_status=status)
        with pytest.raises(cls) as err:
            backend.get_configuration()
        assert (err.value.status, err.value.kind) == (status, kind)
        assert err.value.keeps_owed is (kind in (errors.AUTH, errors.OFFLINE))
    assert errors.kind_for_status(429) == errors.RATE_LIMITED
    assert errors.kind_for_status(409) == errors.CONFLICT
    assert errors.kind_for_status(405) == errors.REFUSED
    assert errors.kind_for_connack(0x86) == errors.AUTH == errors.kind_for_connack(5)
    assert errors.kind_for_connack(0x88) == errors.OFFLINE           # server unavailable


def test_the_error_classes_load_without_the_http_stack():
    out = subprocess.run([sys.executable, "-c", "import sys, mash.sinks.errors; "
                          "print('requests' in sys.modules)"], capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_mash_sensors_are_found_by_type_and_the_room_in_their_name():
    listed = [{"id": "s1", "type": "temperature", "name": "Fruiting temperature"},
              {"id": "s2", "type": "TEMPERATURE", "name": "fruiting-temp (spare)"},
              {"id": "s3", "type": "co2", "name": "spawning CO2"},
              {"id": "s4", "type": "humidity", "name": "hallway"},
              {"id": 5, "type": "humidity", "name": "fruiting"}, "junk", None]
    assert match_sensors(listed) == {("fruiting", "temperature"): "s1", ("spawning", "co2"): "s3"}
    assert match_sensors({"not": "a list"}) == {}
