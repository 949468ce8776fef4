import inspect
import json
import sys

from hypothesis import given, settings, strategies as st

from mash import protocol
from mash.contract import MAX_BOARD_COMMAND, MAX_LINE, RANGES, ROOMS
from mash.protocol import (Ack, Bad, BoardReset, CommandError, Info, Reading, Watchdog,
                           WatchdogRecovered, parse_line)

GOOD = b'{"fruiting":{"temp":24.5,"humidity":85.2,"co2":812},"spawning":{"temp":27.9,"humidity":74.1,"co2":3100}}'


def test_parse_reading_gives_both_rooms():
    msg = parse_line(GOOD)
    assert isinstance(msg, Reading)
    assert [(r.room, r.temp, r.humidity, r.co2) for r in msg.rooms] == [
        ("fruiting", 24.5, 85.2, 812), ("spawning", 27.9, 74.1, 3100)]
    assert msg.rejected == {}


def test_parse_accepts_crlf():
    assert isinstance(parse_line(GOOD + b"\r"), Reading)


def test_invalid_reading_room_is_rejected_other_room_kept():
    msg = parse_line(b'{"fruiting":{"error":"invalid_reading"},"spawning":{"temp":27.9,"humidity":74.1,"co2":3100}}')
    assert [r.room for r in msg.rooms] == ["spawning"]
    assert msg.rejected == {"fruiting": "invalid_reading"}


def test_bad_values_are_classified():
    cases = {
        b'{"fruiting":{"temp":NaN,"humidity":85,"co2":800}}': "not_a_number",
        b'{"fruiting":{"temp":"24","humidity":85,"co2":800}}': "not_a_number",
        b'{"fruiting":{"temp":true,"humidity":85,"co2":800}}': "not_a_number",
        b'{"fruiting":{"temp":61,"humidity":85,"co2":800}}': "out_of_range",
        b'{"fruiting":{"temp":24,"humidity":85,"co2":399}}': "out_of_range",
        b'{"fruiting":{"temp":24,"humidity":101,"co2":800}}': "out_of_range",
        b'{"fruiting":{"temp":24,"humidity":85}}': "missing_field",
        b'{"cellar":{"temp":24,"humidity":85,"co2":800}}': "unknown_room",
    }
    for line, kind in cases.items():
        msg = parse_line(line)
        assert isinstance(msg, Reading) and not msg.rooms, line
        assert list(msg.rejected.values()) == [kind], line


def test_truncated_and_garbage_lines_are_bad():
    assert parse_line(GOOD[:40]) == Bad("truncated", parse_line(GOOD[:40]).detail)
    assert parse_line(b"\xff\xfe\x00garbage").kind == "not_utf8"
    assert parse_line(b"x" * 600).kind == "too_long"
    assert parse_line(b"hello world").kind == "unknown_line"
    assert parse_line(b"{}").kind == "bad_json"
    assert parse_line(b"[1,2,3]").kind == "unknown_line"
    assert parse_line(b"{" * 5000 + b"}" * 5000).kind == "too_long"


def test_deep_nesting_under_the_length_limit_is_parsed_and_classified():
    depth = (MAX_LINE - len(b'{"fruiting":}')) // 2                 # as deep as a line can go
    deep = b'{"fruiting":' + b"[" * depth + b"]" * depth + b"}"
    assert len(deep) <= MAX_LINE and depth > 200                    # not the too_long path
    assert parse_line(deep) == Reading(rooms=[], rejected={"fruiting": "bad_room_data"})
    # nesting past what the decoder can take is a counted bad line, never an exception
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(len(inspect.stack()) + depth // 2)       # below the line's depth
    try:
        assert parse_line(deep) == Bad("bad_json", "nested too deep")
    finally:
        sys.setrecursionlimit(limit)


def test_board_lines_are_recognised():
    assert parse_line(b"[CMD] Set MIST_MAKER to ON\r") == Ack("MIST_MAKER", "ON", "[CMD] Set MIST_MAKER to ON")
    assert isinstance(parse_line(b"[ERROR] Unknown actuator: FOO"), CommandError)
    assert isinstance(parse_line(b"[ERROR] deserializeJson() failed: InvalidInput"), CommandError)
    assert isinstance(parse_line(b"[ERROR] Invalid JSON command format. Missing 'actuator' or 'state'."), CommandError)
    assert isinstance(parse_line(b"[READY] System ready..."), BoardReset)
    assert isinstance(parse_line(b'{"watchdog":"recovered"}'), WatchdogRecovered)
    assert isinstance(parse_line(b"[WATCHDOG] No serial data for 60s (RPi keepalive missing)"), Watchdog)
    for line in (b"====", b"  M.A.S.H. IoT - Arduino Firmware v1.0", b"[OK] SCD41", b"[SAFETY] All actuators OFF",
                 b"[I2C] scan", b"[WARNING] x", b"[INFO] y", b"[ERROR] sensor fault", b"", b"\r",
                 b"  Mushroom Automation Smart Home", b"[INIT] SCD41 fruiting", b"[WDT] 8s"):
        assert isinstance(parse_line(line), Info), line
    assert parse_line(b"[CMD] Set TOASTER to ON").kind == "bad_ack"


def test_encode_command_is_the_firmware_line():
    assert protocol.encode_command("mist_maker", "on") == b'{"actuator":"MIST_MAKER","state":"ON"}\n'
    for actuator in protocol.ACTUATORS:
        assert len(protocol.encode_command(actuator, "OFF")) <= MAX_BOARD_COMMAND
    for bad in (("TOASTER", "ON"), ("MIST_MAKER", "HALF"), (None, "ON")):
        try:
            protocol.encode_command(*bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad} accepted")


def _room_values(lo_hi, integer=False):
    lo, hi = lo_hi
    if integer:
        return st.integers(int(lo), int(hi))
    return st.floats(lo, hi, allow_nan=False).map(lambda v: round(v, 1)).filter(lambda v: lo <= v <= hi)


room_values = st.fixed_dictionaries({"temp": _room_values(RANGES["temp"]),
                                     "humidity": _room_values(RANGES["humidity"]),
                                     "co2": _room_values(RANGES["co2"], integer=True)})


@settings(max_examples=1500, deadline=None)
@given(st.dictionaries(st.sampled_from(ROOMS), room_values, min_size=1),
       st.sampled_from([b"\n", b"\r\n", b""]))
def test_a_generated_valid_line_parses_to_exactly_its_reading(rooms, ending):
    """Every line the firmware may print with values in its ranges is a Reading of exactly
    those values: never rejected, never the catch-all kind."""
    raw = json.dumps(rooms, separators=(",", ":")).encode() + ending
    msg = parse_line(raw.rstrip(b"\n"))
    assert isinstance(msg, Reading), msg
    assert msg.rejected == {}
    assert {r.room: {"temp": r.temp, "humidity": r.humidity, "co2": r.co2} for r in msg.rooms} == rooms


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(ROOMS), st.sampled_from(sorted(RANGES)), st.sampled_from([-1, 1]),
       st.floats(0.01, 1000, allow_nan=False))
def test_a_value_just_outside_the_firmware_range_is_out_of_range(room, field, side, beyond):
    lo, hi = RANGES[field]
    values = {"temp": 24.0, "humidity": 85.0, "co2": 800}
    values[field] = (hi + beyond) if side > 0 else (lo - beyond)
    if field == "co2":
        values[field] = int(values[field] + side)        # whole ppm, still outside
    msg = parse_line(json.dumps({room: values}).encode())
    assert isinstance(msg, Reading) and msg.rooms == [] and msg.rejected == {room: "out_of_range"}


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=700))
def test_parser_never_raises_on_arbitrary_bytes(raw):
    msg = parse_line(raw)
    assert isinstance(msg, (Reading, Bad, Ack, CommandError, BoardReset, WatchdogRecovered,
                            Watchdog, Info))
    if isinstance(msg, Reading):
        for r in msg.rooms:
            assert -10 <= r.temp <= 60 and 0 <= r.humidity <= 100 and 400 <= r.co2 <= 5000


json_values = st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=10),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=10), c, max_size=3),
                           max_leaves=10)


@settings(max_examples=600, deadline=None)
@given(st.dictionaries(st.sampled_from(["fruiting", "spawning", "x"]),
                       st.dictionaries(st.sampled_from(["temp", "humidity", "co2", "error"]), json_values,
                                       max_size=4), max_size=3))
def test_parser_never_raises_on_reading_shaped_json(obj):
    raw = json.dumps(obj, allow_nan=True).encode()
    msg = parse_line(raw)
    assert isinstance(msg, (Reading, Bad)), msg
    if isinstance(msg, Reading):       # every room is either a good reading or has a reason
        assert {r.room for r in msg.rooms} | set(msg.rejected) == set(obj)
