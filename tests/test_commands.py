"""Command validation and payload parsing: pure logic, no I/O."""
import datetime as dt
import json

import pytest

from mash.clock import utcnow
from mash.commands import Rejected, mash_mqtt_command, merge_configuration, parse_payload, validate
from mash.contract import MAX_PARSE_BYTES

DEVICE = "rpi_gateway_001"


def rejected(cmd, size=100):
    with pytest.raises(Rejected) as err:
        validate(cmd, DEVICE, size)
    return str(err.value)


def test_set_actuator_is_normalised_upper_case():
    command, params, expires = validate({"id": "a", "command": "set_actuator",
                                         "parameters": {"actuator": "mist_maker", "state": "on",
                                                        "extra": 1}}, DEVICE, 80)
    assert (command, params, expires) == ("set_actuator", {"actuator": "MIST_MAKER", "state": "ON"}, None)


def test_every_way_a_command_is_refused_has_its_reason():
    past = (utcnow() - dt.timedelta(minutes=1)).isoformat() + "Z"
    assert "oversize" in rejected({"command": "REQUEST_STATUS"}, size=5000)
    assert "addressed to device" in rejected({"command": "REQUEST_STATUS", "deviceId": "other"})
    assert "unknown command" in rejected({"command": "request_status"})      # names are exact
    assert "malformed" in rejected({"command": "set_actuator", "parameters": {"actuator": "RESERVED",
                                                                              "state": "ON"}})
    assert "malformed" in rejected({"command": "set_actuator", "parameters": []})
    assert "expired" in rejected({"command": "force_sync", "expiresAt": past})
    assert "malformed" in rejected({"command": "force_sync", "expiresAt": "tomorrow"})
    assert "unknown setting" in rejected({"command": "CONFIGURE", "parameters": {"colour": 1}})
    assert "whole number" in rejected({"command": "CONFIGURE", "parameters": {"sync_interval": 0}})
    assert "unknown room" in rejected({"command": "CONFIGURE",
                                       "parameters": {"thresholds": {"cellar": {"temp_max": 3}}}})


def test_payloads_without_a_usable_object_are_classified():
    assert parse_payload(b"not json")[1] == "bad_json"
    assert parse_payload(b"[1]")[1] == "not_object"
    assert parse_payload(b"\xff")[1] == "bad_json"
    assert parse_payload(b"[" * 100000)[1] == "bad_json"
    cmd, bad, _ = parse_payload(json.dumps({"id": "x", "command": "force_sync"}).encode())
    assert bad is None and cmd["id"] == "x"


def test_an_oversize_payload_keeps_its_id_without_being_parsed_whole():
    big = json.dumps({"id": "big-1", "command": "REQUEST_STATUS",
                      "parameters": {"pad": "x" * MAX_PARSE_BYTES}}).encode()
    cmd, bad, _ = parse_payload(big)
    assert cmd == {"id": "big-1"} and bad is None
    assert "oversize" in rejected(cmd, size=len(big))
    no_id = json.dumps({"command": "REQUEST_STATUS", "pad": "x" * MAX_PARSE_BYTES}).encode()
    assert parse_payload(no_id)[:2] == (None, "too_large")


def test_configure_merges_thresholds_per_room_and_replaces_intervals():
    current = {"thresholds": {"fruiting": {"temp_max": 27}}, "sync_interval": 30}
    merged = merge_configuration(current, {"thresholds": {"fruiting": {"temp_min": 21},
                                                          "spawning": {"temp_max": 31}},
                                           "sync_interval": 10})
    assert merged == {"thresholds": {"fruiting": {"temp_max": 27, "temp_min": 21},
                                     "spawning": {"temp_max": 31}}, "sync_interval": 10}
    assert current == {"thresholds": {"fruiting": {"temp_max": 27}}, "sync_interval": 30}


def test_commands_update_needs_an_https_url_and_a_sha256():
    good = {"version": "0.2.0", "url": "https://releases.example.org/mash_gateway-0.2.0-py3-none-any.whl",
            "sha256": "AB" * 32}
    command, params, _ = validate({"id": "u", "command": "update", "parameters": good}, DEVICE, 200)
    assert command == "update" and params == {**good, "sha256": "ab" * 32}
    local = {**good, "url": "http://127.0.0.1:8000/mash_gateway-0.2.0-py3-none-any.whl"}
    assert validate({"command": "update", "parameters": local}, DEVICE, 200)[1]["url"] == local["url"]
    assert "https" in rejected({"command": "update", "parameters": {**good, "url": "http://example.org/x.whl"}})
    assert "sha256" in rejected({"command": "update", "parameters": {**good, "sha256": "abc"}})
    assert "version" in rejected({"command": "update", "parameters": {**good, "version": ""}})
    assert "unknown parameter" in rejected({"command": "update", "parameters": {**good, "token": "x"}})
    assert validate({"command": "RESTART", "parameters": {"x": 1}}, DEVICE, 50)[:2] == ("RESTART", {})


# -- the deployed MASH backend's commands (CONTRACT §9) ----------------------------------------
def test_mash_start_and_stop_switch_a_relay_by_firmware_or_app_name():
    ok = lambda params, name="START": validate({"id": "c1", "command": name, "parameters": params},  # noqa: E731
                                               ("MASH-X", "cuid1"), 100)[:2]
    assert ok({"actuator": "MIST_MAKER"}) == ("set_actuator", {"actuator": "MIST_MAKER", "state": "ON"})
    assert ok({"actuator": "mist_maker"}, "STOP") == ("set_actuator", {"actuator": "MIST_MAKER", "state": "OFF"})
    assert ok({"actuator": "exhaust_fan", "room": "spawning"}) == (
        "set_actuator", {"actuator": "SPAWNING_EXHAUST_FAN", "state": "ON"})
    for bad in ({}, {"actuator": "exhaust_fan"}, {"actuator": "KETTLE"}):
        with pytest.raises(Rejected, match="malformed"):
            ok(bad)


def test_mash_commands_are_addressed_to_the_serial_or_the_backends_id():
    cmd = {"id": "c1", "command": "REQUEST_STATUS", "deviceId": "cuid1"}
    assert validate(cmd, ("MASH-X", "cuid1"), 10)[0] == "REQUEST_STATUS"
    with pytest.raises(Rejected, match="addressed to device 'cuid1'"):
        validate(cmd, ("MASH-X",), 10)


def test_mash_update_firmware_is_an_update_and_reset_calibrate_are_not_supported():
    sha = "a" * 64
    command, params, _ = validate({"id": "u", "command": "UPDATE_FIRMWARE", "parameters": {
        "version": "0.9.0", "url": "https://example.org/mash.whl", "checksum": sha}}, "d", 100)
    assert (command, params) == ("update", {"version": "0.9.0", "url": "https://example.org/mash.whl",
                                            "sha256": sha})
    with pytest.raises(Rejected, match="sha256 must be 64 hex"):
        validate({"id": "u", "command": "UPDATE_FIRMWARE", "parameters": {
            "version": "0.9.0", "url": "https://example.org/mash.whl", "checksum": "md5"}}, "d", 100)
    for name in ("RESET", "CALIBRATE"):
        with pytest.raises(Rejected, match=f"not supported: {name}"):
            validate({"id": "r", "command": name}, "d", 10)


def test_mash_mqtt_messages_get_an_id_from_their_bytes_so_a_redelivery_is_the_same_command():
    raw = json.dumps({"command": "START", "parameters": {"actuator": "MIST_MAKER"},
                      "timestamp": "2026-12-02T10:00:00.000Z"}).encode()
    first, _, _ = mash_mqtt_command("command", "devices/c1/command", raw)
    again, _, _ = mash_mqtt_command("command", "devices/c1/command", raw)
    later, _, _ = mash_mqtt_command("command", "devices/c1/command",
                                    raw.replace(b"10:00:00", b"10:00:05"))
    assert first == again and first["id"].startswith("mq-") and later["id"] != first["id"]
    assert first["command"] == "START" and first["parameters"] == {"actuator": "MIST_MAKER"}
    config, _, _ = mash_mqtt_command("config", "devices/c1/config",
                                     b'{"configuration":{"heartbeat_interval":30},"timestamp":"t"}')
    assert (config["command"], config["parameters"]) == ("CONFIGURE", {"heartbeat_interval": 30})
    status, _, _ = mash_mqtt_command("request_status", "devices/c1/request/status", b'{"timestamp":"t"}')
    assert status["command"] == "REQUEST_STATUS"
    assert mash_mqtt_command("command", "devices/c1/command", b"not json")[1] == "bad_json"
