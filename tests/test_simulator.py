"""The simulated board behaves like firmware v1.0 on a real pseudo-terminal."""
import time

import pytest
import serial

from mash.protocol import BoardReset, Reading, WatchdogRecovered, parse_line
from mash.simulator import SimulatedBoard
from tests.services import wait_for


@pytest.fixture
def board(tmp_path):
    b = SimulatedBoard(interval=0, link=tmp_path / "ttyMASH", seed=3, watchdog_after=1.0).start(banner=False)
    yield b
    b.stop()


def lines(link, until, timeout=5.0):
    got, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        raw = link.readline()
        if raw:
            got.append(raw.rstrip(b"\r\n"))
            if until(got):
                return got
    raise AssertionError(f"timed out; got {got}")


def test_opening_the_port_resets_the_board_with_its_banner(board):
    with serial.Serial(board.port, 9600, timeout=0.2) as link:
        got = lines(link, lambda g: any(isinstance(parse_line(x), BoardReset) for x in g))
    assert got[1] == b"  M.A.S.H. IoT - Arduino Firmware v1.0" and board.boots == 1


def test_commands_switch_relays_and_are_answered_in_the_firmwares_words(board):
    with serial.Serial(board.port, 9600, timeout=0.2) as link:
        lines(link, lambda g: g and g[-1].startswith(b"[READY]"))
        link.write(b'{"actuator":"MIST_MAKER","state":"ON"}\n')
        assert lines(link, lambda g: g)[-1] == b"[CMD] Set MIST_MAKER to ON"
        assert board.actuators["MIST_MAKER"] == "ON"
        link.write(b'{"actuator":"TOASTER","state":"ON"}\n')
        assert lines(link, lambda g: g)[-1] == b"[ERROR] Unknown actuator: TOASTER"
        link.write(b'{"state":"ON"}\n')
        assert lines(link, lambda g: g)[-1].startswith(b"[ERROR] Invalid JSON command format")
        link.write(b"{oops\n")
        assert lines(link, lambda g: g)[-1].startswith(b"[ERROR] deserializeJson() failed")


def test_readings_are_valid_lines_and_an_invalid_room_says_so(board):
    with serial.Serial(board.port, 9600, timeout=0.2) as link:
        lines(link, lambda g: g and g[-1].startswith(b"[READY]"))
        board.set_invalid("fruiting")
        board.emit_reading()
        msg = parse_line(lines(link, lambda g: g)[-1])
    assert isinstance(msg, Reading) and [r.room for r in msg.rooms] == ["spawning"]
    assert msg.rejected == {"fruiting": "invalid_reading"}


def test_watchdog_trips_without_keepalive_and_recovers_on_the_next_line(board):
    with serial.Serial(board.port, 9600, timeout=0.2) as link:
        lines(link, lambda g: g and g[-1].startswith(b"[READY]"))
        link.write(b'{"actuator":"FRUITING_LED","state":"ON"}\n')
        got = lines(link, lambda g: any(x.startswith(b"[WATCHDOG]") for x in g), timeout=5)
        assert board.actuators["FRUITING_LED"] == "OFF"          # the watchdog's safety
        link.write(b'{"keepalive":true}\n')
        got = lines(link, lambda g: g)
    assert isinstance(parse_line(got[-1]), WatchdogRecovered)


def test_unplug_removes_the_link_and_replug_brings_a_fresh_board(board, tmp_path):
    board.actuators["MIST_MAKER"] = "ON"
    board.unplug()
    assert not (tmp_path / "ttyMASH").exists()
    board.replug()
    wait_for(lambda: (tmp_path / "ttyMASH").exists(), what="link back")
    assert board.actuators["MIST_MAKER"] == "OFF" and board.boots == 1
