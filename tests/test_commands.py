"""Command validation and payload parsing: pure logic, no I/O."""
import datetime as dt
import json

import pytest

from mash.clock import utcnow
from mash.commands import Rejected, merge_configuration, parse_payload, validate
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
