"""The reader against a real pseudo-terminal driven by the simulated board."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from mash import protocol
from mash.models import Store
from mash.reader import Reader
from mash.simulator import SimulatedBoard
from tests.services import ROOT, wait_for


@pytest.fixture
def board(tmp_path):
    b = SimulatedBoard(interval=0, link=tmp_path / "ttyMASH", seed=1).start(banner=False)
    yield b
    b.stop()


@pytest.fixture
def start_reader(make_settings, board):
    started = []

    def start(**attrs):
        # the command path alone: climate control has tests of its own (test_control_loop)
        settings = make_settings(SERIAL_PORT=board.port, CONTROL_MODE="off")
        r = Reader(settings)
        for k, v in attrs.items():
            setattr(r.board if hasattr(r.board, k) else r, k, v)
        boots = board.boots
        t = threading.Thread(target=r.run, daemon=True)
        t.start()
        started.append((r, t))
        wait_for(lambda: r.connected_port, what="reader to open the port")
        wait_for(lambda: board.boots > boots, what="the board's reset on open")   # as a real Arduino
        return r
    yield start
    for r, t in started:
        r.stop()
        t.join(10)


def reading(seq):
    """A reading whose co2 values encode ``seq``, so every stored row can be traced to its line."""
    return {"fruiting": {"temp": 24.0, "humidity": 85.0, "co2": 400 + seq},
            "spawning": {"temp": 28.0, "humidity": 70.0, "co2": 4600 - seq}}


def rows(store):
    return store.m.SensorData.select().count()


def test_reader_stores_every_line_kind_and_1000_readings_exactly_once(start_reader, board):
    r = start_reader()
    for line in [b"==========", b"  M.A.S.H. IoT - Arduino Firmware v1.0", b"[OK] SCD41 ready",
                 b"[SAFETY] All actuators OFF", b"[I2C] scan done", b"[WARNING] fan slow",
                 b"[INFO] hello", b"[WATCHDOG] No serial data for 60s (RPi keepalive missing)",
                 b'{"fruiting":{"error":"invalid_reading"},"spawning":{"temp":28,"humidity":70,"co2":900}}',
                 b'{"fruiting":{"temp":NaN,"humidity":85,"co2":800}}', b"\xff\xfe garbage",
                 b'{"fruiting":{"temp":24', b"[CMD] Set MIST_MAKER to ON", b"x" * 2000]:
        board.inject(line + b"\r\n")
    for seq in range(1000):
        board.emit_reading(reading(seq))
    wait_for(lambda: rows(r.store) >= 2001, timeout=60, what="1,000 readings stored")
    time.sleep(0.5)
    assert rows(r.store) == 2001        # 1,000 lines x 2 rooms + the good room of the invalid_reading line
    S = r.store.m.SensorData
    co2 = sorted(x.co2 for x in S.select().where(S.room == "fruiting"))
    assert co2 == list(range(400, 1400))
    r.flush_counts()
    counts = r.store.counters()
    for kind in ("invalid_reading", "not_a_number", "not_utf8", "truncated", "too_long", "unexpected_reply"):
        assert counts.get(f"bad_line.{kind}", 0) >= 1, kind
    import sqlite3
    with sqlite3.connect(r.settings.db_path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM sensor_data WHERE synced = 0").fetchone()[0] == 2001


def test_reader_reopens_after_unplug_and_restores_relays(start_reader, board):
    r = start_reader()
    r.store.set_desired("MIST_MAKER", "ON")
    r.store.set_desired("FRUITING_LED", "ON")
    board.emit_reading(reading(1))
    wait_for(lambda: rows(r.store) == 2, what="first reading")
    board.unplug()
    time.sleep(1.0)
    t0 = time.monotonic()
    board.replug()                 # a fresh board: banner, relays OFF
    wait_for(lambda: board.actuators["MIST_MAKER"] == "ON" and board.actuators["FRUITING_LED"] == "ON",
             timeout=5, what="desired states re-sent after the banner")
    board.emit_reading(reading(2))
    wait_for(lambda: rows(r.store) == 4, timeout=5, what="readings after replug")
    assert time.monotonic() - t0 < 5


def test_reader_resends_desired_state_after_watchdog_recovery(start_reader, board):
    r = start_reader()
    r.store.set_desired("HUMIDIFIER_FAN", "ON")
    board.inject(b'{"watchdog":"recovered"}\r\n')
    wait_for(lambda: board.actuators["HUMIDIFIER_FAN"] == "ON", what="relay restored")


def test_watchdog_recovery_keeps_waiting_for_the_command_it_did_not_reset(start_reader, board):
    """After a watchdog recovery the relays are as they were and a command written just
    before still runs: its reply is awaited, not written again."""
    r = start_reader()
    board.reply_delay = 1.0                    # a slow I2C read on the board
    r.store.add_command("wd-1", "set_actuator", {"actuator": "FRUITING_LED", "state": "ON"}, "mqtt")
    wait_for(lambda: board.received.count(b'{"actuator":"FRUITING_LED","state":"ON"}') == 1,
             what="command written")
    board.inject(b'{"watchdog":"recovered"}\r\n')
    wait_for(lambda: r.store.command("wd-1").status == "completed", what="the reply")
    assert board.received.count(b'{"actuator":"FRUITING_LED","state":"ON"}') == 1
    assert r.store.command("wd-1").attempts == 1


def test_a_reply_slower_than_two_seconds_is_waited_for_not_written_again(start_reader, board):
    """CONTRACT §1: a [CMD] reply can take ~7 s while a sensor read blocks the board."""
    r = start_reader()
    assert r.board.ACK_TIMEOUT >= 7
    board.reply_delay = 3.0
    r.store.add_command("slow-1", "set_actuator", {"actuator": "MIST_MAKER", "state": "ON"}, "mqtt")
    wait_for(lambda: r.store.command("slow-1").status == "completed", timeout=10, what="the reply")
    assert board.received.count(b'{"actuator":"MIST_MAKER","state":"ON"}') == 1


def test_an_overlong_line_arriving_over_many_reads_is_counted_once(start_reader, board):
    r = start_reader()
    long_line = b"x" * (5 * protocol.MAX_LINE)
    for k in range(0, len(long_line), protocol.MAX_LINE // 2):     # read after read, no newline
        board.inject(long_line[k:k + protocol.MAX_LINE // 2])
        time.sleep(0.02)
    board.inject(b"\r\n")
    board.emit_reading(reading(1))
    wait_for(lambda: rows(r.store) == 2, what="the reading after the long line")
    r.flush_counts()
    wait_for(lambda: "bad_line.too_long" in r.store.counters(), what="the count written")
    assert r.store.counters()["bad_line.too_long"] == 1


def test_boot_information_lines_are_not_counted_as_bad(start_reader, board):
    r = start_reader()
    board.inject(b"\r\n  Mushroom Automation Smart Home\r\n[INIT] sensors\r\n[WDT] armed 8s\r\n\r\n")
    board.emit_reading(reading(1))
    wait_for(lambda: rows(r.store) == 2, what="reading after the banner")
    assert not any(k.startswith("bad_line.") for k in r.store.counters()) and not r.bad_counts


def test_reader_reconnects_when_the_board_goes_silent(start_reader, board):
    r = start_reader(SILENCE=1.0)
    t0 = time.monotonic()
    wait_for(lambda: r.connections >= 2, timeout=5, what="reopened after silence")
    assert time.monotonic() - t0 >= 0.9


def test_reader_writes_keepalive_when_idle(start_reader, board):
    start_reader(KEEPALIVE_EVERY=0.3)
    wait_for(lambda: b'{"keepalive":true}' in board.received, timeout=5, what="keepalive")


def test_set_actuator_in_the_ledger_reaches_the_board_and_completes(start_reader, board):
    r = start_reader()
    r.store.add_command("cmd-1", "set_actuator", {"actuator": "mist_maker", "state": "on"}, "mqtt")
    wait_for(lambda: r.store.command("cmd-1").status == "completed", what="completed")
    assert board.received[-1] == b'{"actuator":"MIST_MAKER","state":"ON"}'
    cmd = r.store.command("cmd-1")
    assert json.loads(cmd.response)["board"] == "[CMD] Set MIST_MAKER to ON"
    assert r.store.desired_states()["MIST_MAKER"] == "ON"
    assert [o.ref for o in r.store.owed("backend")] == ["cmd-1"]     # the ack is owed to both sinks
    assert [o.ref for o in r.store.owed("mqtt")] == ["cmd-1"]


def test_board_error_reply_marks_the_command_failed_with_the_reason(start_reader, board):
    r = start_reader()
    board.refuse_next = "[ERROR] Invalid JSON command format. Missing 'actuator' or 'state'."
    r.store.add_command("cmd-2", "set_actuator", {"actuator": "FRUITING_LED", "state": "ON"}, "backend")
    wait_for(lambda: r.store.command("cmd-2").status == "failed", what="failed")
    cmd = r.store.command("cmd-2")
    assert "Invalid JSON command format" in cmd.reason
    assert "FRUITING_LED" not in r.store.desired_states()


def test_unanswered_command_is_retried_then_failed(start_reader, board):
    r = start_reader(ACK_TIMEOUT=0.3)
    board.mute_next = 1                       # the first write is lost; the retry is answered
    r.store.add_command("cmd-3", "set_actuator", {"actuator": "FRUITING_LED", "state": "ON"}, "mqtt")
    wait_for(lambda: r.store.command("cmd-3").status == "completed", what="retried")
    assert r.store.command("cmd-3").attempts == 1
    assert board.received.count(b'{"actuator":"FRUITING_LED","state":"ON"}') == 2
    board.mute_next = 10
    r.store.add_command("cmd-4", "set_actuator", {"actuator": "MIST_MAKER", "state": "ON"}, "mqtt")
    wait_for(lambda: r.store.command("cmd-4").status == "failed", timeout=5, what="failed")
    assert "no reply" in r.store.command("cmd-4").reason


def test_expired_command_never_reaches_the_board(start_reader, board):
    import datetime as dt
    r = start_reader()
    past = dt.datetime.utcnow() - dt.timedelta(seconds=5)
    r.store.add_command("cmd-5", "set_actuator", {"actuator": "MIST_MAKER", "state": "ON"}, "mqtt",
                        expires_at=past)
    wait_for(lambda: r.store.command("cmd-5").status == "failed", what="expired")
    assert b'{"actuator":"MIST_MAKER","state":"ON"}' not in board.received


def test_reader_process_kill_9_loses_no_committed_reading(tmp_path, data_dir, board):
    env = dict(os.environ, SERIAL_PORT=board.port, MASH_DATA_DIR=str(data_dir), LOG_LEVEL="INFO")
    log = open(tmp_path / "reader.log", "ab")

    def spawn():
        return subprocess.Popen([sys.executable, str(ROOT / "reader.py")], env=env, stdout=log,
                                stderr=log, cwd=str(tmp_path))

    proc = spawn()
    store = Store(data_dir / "mash.db")
    stop = threading.Event()

    def stream():
        seq = 0
        while not stop.is_set():
            board.emit_reading(reading(seq % 4000))
            seq += 1
            time.sleep(0.01)

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    try:
        wait_for(lambda: rows(store) >= 200, timeout=20, what="readings before the kill")
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        before = {(x.id, x.room, x.co2, x.timestamp) for x in store.m.SensorData.select()}
        assert before
        proc = spawn()
        n = len(before)
        wait_for(lambda: rows(store) >= n + 200, timeout=20, what="readings after the restart")
    finally:
        stop.set()
        t.join(5)
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    after = {(x.id, x.room, x.co2, x.timestamp) for x in store.m.SensorData.select()}
    assert before <= after                           # every committed reading survived
    ids = [x.id for x in store.m.SensorData.select(store.m.SensorData.id)]
    assert len(ids) == len(set(ids))
    pairs = {}
    for x in store.m.SensorData.select():
        pairs.setdefault(x.timestamp, []).append(x.room)
    assert all(sorted(v) == ["fruiting", "spawning"] for v in pairs.values())   # no half line
    assert proc.returncode == 0
    assert store.pending_count() == len(ids)
