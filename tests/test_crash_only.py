"""Crash-only, supervised processes: a failing store never kills the reader nor loses what it
holds; a worker that cannot start exits; systemd's notify protocol (READY, WATCHDOG) for
real over a unix datagram socket; a corrupt store is set aside and a fresh one started;
status, doctor and export never create a store.

Store writes fail for real here: SQLite triggers that RAISE on every insert and update of
the reader's tables (the tests run as root, so a read-only file mode would not stop them)."""
import datetime
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from mash.models import Store
from mash.protocol import encode_reading
from mash.reader import Reader
from mash.simulator import SimulatedBoard
from tests.services import ROOT, free_port, stop_process, wait_for

TABLES = ("sensor_data", "alerts", "counters", "meta", "commands", "outbox", "actuator_state")


def refuse_writes(db_path) -> None:
    """From another connection, as a full or failing disk would: every write of the reader
    now fails inside SQLite."""
    with sqlite3.connect(db_path) as con:
        for table in TABLES:
            for op in ("INSERT", "UPDATE"):
                con.execute(f"CREATE TRIGGER refuse_{op}_{table} BEFORE {op} ON {table} "
                            "BEGIN SELECT RAISE(ABORT, 'the store refuses writes'); END")


def accept_writes(db_path) -> None:
    with sqlite3.connect(db_path) as con:
        for table in TABLES:
            for op in ("INSERT", "UPDATE"):
                con.execute(f"DROP TRIGGER refuse_{op}_{table}")


@pytest.fixture
def board(tmp_path):
    b = SimulatedBoard(interval=0, link=tmp_path / "ttyMASH", seed=1).start(banner=False)
    yield b
    b.stop()


def reading(seq):
    return {"fruiting": {"temp": 24.0, "humidity": 85.0, "co2": 400 + seq},
            "spawning": {"temp": 28.0, "humidity": 70.0, "co2": 900}}


def test_store_failing_while_the_board_is_absent_kills_nothing_and_loses_nothing(make_settings,
                                                                                 board, caplog):
    settings = make_settings(SERIAL_PORT=board.port, CONTROL_MODE="off", STALE_AFTER="10")
    r = Reader(settings)
    r.housekeeping.EVERY = 0.5
    boots = board.boots
    t = threading.Thread(target=r.run, daemon=True)
    t.start()
    try:
        wait_for(lambda: r.connected_port, what="the reader to open the port")
        wait_for(lambda: board.boots > boots, what="the board's reset on open")
        refuse_writes(settings.db_path)
        with caplog.at_level("INFO", logger="mash.reader"):
            # five readings and three bad lines in one write: handled in one loop step
            board.inject(b"".join(encode_reading(reading(seq)) for seq in range(5)) +
                         b"\xff\xfe\n" * 3)
            wait_for(lambda: "cannot write to the store" in caplog.text, what="writes refused")
            board.unplug()
            wait_for(lambda: r.connected_port is None, what="the reader to see the board gone")
            # with no board: the bad-line counts, heartbeats and (10 s on) the stale alerts,
            # each refused by the store
            wait_for(lambda: "alert raised: no valid spawning reading" in caplog.text
                     or not t.is_alive(), timeout=40, what="the stale-sensor alerts")
            assert t.is_alive(), "the reader died"
            assert r.store_error and r.unstored
            accept_writes(settings.db_path)
            wait_for(lambda: not r.unstored, timeout=15, what="everything held written")
        assert t.is_alive()
        S, A = r.store.m.SensorData, r.store.m.Alert
        co2 = sorted(x.co2 for x in S.select().where(S.room == "fruiting"))
        assert co2 == [400, 401, 402, 403, 404]
        assert S.select().count() == 10
        assert r.store.counters().get("bad_line.not_utf8") == 3
        stale = sorted(a.room for a in A.select().where(A.event_type == "sensor_stale"))
        assert stale == ["fruiting", "spawning"]
        assert r.store.processes()["reader"]["board"]["connected"] is False
    finally:
        r.stop()
        t.join(10)
    assert r.clean_stop


def test_past_its_memory_bound_the_reader_drops_the_oldest_and_counts_them(make_settings,
                                                                           caplog):
    r = Reader(make_settings(CONTROL_MODE="off"))
    r.UNSTORED_MAX = 10
    refuse_writes(r.settings.db_path)
    with caplog.at_level("ERROR", logger="mash.reader"):
        for seq in range(15):
            r.handle_line(encode_reading(reading(seq)).strip())
        assert r.dropped == 5 and len(r.unstored) == 10
        assert caplog.text.count("10 writes held in memory, the most it keeps") == 1
        accept_writes(r.settings.db_path)
        r.housekeeping._last = 0
        r.chores()
    assert not r.unstored
    S = r.store.m.SensorData
    assert sorted(x.co2 for x in S.select().where(S.room == "fruiting")) == list(range(405, 415))
    assert r.store.counters()["reader_dropped"] == 5
    assert "5 held writes had been dropped" in caplog.text


def test_a_stop_that_cannot_write_says_how_much_and_exits_non_zero(tmp_path, board):
    data = tmp_path / "data"
    env = dict(os.environ, MASH_DATA_DIR=str(data), SERIAL_PORT=board.port, CONTROL_MODE="off",
               CLOCK_SYNC="trust", PYTHONPATH=str(ROOT))
    log = tmp_path / "reader.log"
    boots = board.boots
    proc = subprocess.Popen([sys.executable, "-m", "mash.reader"], env=env, cwd=str(tmp_path),
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "board connected" in log.read_text(), timeout=30, what="the reader up")
        wait_for(lambda: board.boots > boots, what="the board's reset on open")
        refuse_writes(data / "mash.db")
        # three lines in one write: handled in one loop step, before the stop is seen
        board.inject(b"".join(encode_reading(reading(seq)) for seq in range(3)))
        wait_for(lambda: "cannot write to the store" in log.read_text(), timeout=15,
                 what="the reader to hold readings")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 1
    finally:
        stop_process(proc)
    text = log.read_text()
    line = re.search(r"reader stopped with (\d+) held writes NOT written \(([^)]*)\)", text)
    assert line, text
    assert "3 reading" in line.group(2)
    assert "reader stopped\n" not in text


# -- the worker's start-up ---------------------------------------------------------------------
@pytest.mark.parametrize("command", [["-m", "huey.bin.huey_consumer", "mash.tasks.huey"],
                                     ["-m", "mash.worker"]])
def test_a_worker_whose_store_cannot_be_opened_exits_non_zero(tmp_path, command):
    data = tmp_path / "data"
    (data / "mash.db").mkdir(parents=True)          # SQLite cannot open a directory
    env = dict(os.environ, MASH_DATA_DIR=str(data), PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, *command], env=env, cwd=str(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=30)
    finally:
        stop_process(proc)
    assert proc.returncode == 1
    assert "worker cannot start: OperationalError: unable to open database file" in out


# -- systemd's notify protocol -----------------------------------------------------------------
class NotifySocket:
    """What systemd listens on: a unix datagram socket ($NOTIFY_SOCKET)."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="mash-notify-", dir="/tmp")   # short: sun_path
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.got: list[tuple[float, str]] = []

    def env(self, watchdog_s: float = 1.0) -> dict:
        return {"NOTIFY_SOCKET": self.path, "WATCHDOG_USEC": str(int(watchdog_s * 1e6))}

    def drain(self) -> list[str]:
        while True:
            try:
                msg = self.sock.recv(4096).decode()
            except socket.timeout:
                break
            self.got.append((time.monotonic(), msg))
        return [m for _, m in self.got]

    def last(self, msg: str) -> float | None:
        self.drain()
        times = [t for t, m in self.got if m == msg]
        return times[-1] if times else None

    def close(self):
        self.sock.close()
        os.unlink(self.path)
        os.rmdir(self.dir)


@pytest.fixture
def notify_socket():
    s = NotifySocket()
    yield s
    s.close()


def ready_then_watchdog(sock: NotifySocket, proc, what: str) -> None:
    wait_for(lambda: "WATCHDOG=1" in sock.drain() or proc.poll() is not None, timeout=60,
             what=f"{what}: WATCHDOG=1")
    assert proc.poll() is None
    got = sock.drain()
    assert got[0] == "READY=1", got
    assert got.index("READY=1") < got.index("WATCHDOG=1")
    first = len([m for m in got if m == "WATCHDOG=1"])
    wait_for(lambda: len([m for m in sock.drain() if m == "WATCHDOG=1"]) > first + 1,
             timeout=10, what=f"{what}: WATCHDOG=1 again")


def test_reader_says_ready_pings_the_watchdog_and_stops_pinging_when_its_loop_hangs(
        tmp_path, board, notify_socket):
    data = tmp_path / "data"
    env = dict(os.environ, MASH_DATA_DIR=str(data), SERIAL_PORT=board.port, CONTROL_MODE="off",
               CLOCK_SYNC="trust", PYTHONPATH=str(ROOT), **notify_socket.env(watchdog_s=1.0))
    boots = board.boots
    proc = subprocess.Popen([sys.executable, "-m", "mash.reader"], env=env, cwd=str(tmp_path))
    try:
        ready_then_watchdog(notify_socket, proc, "the reader")
        wait_for(lambda: board.boots > boots, timeout=20, what="the board's reset on open")
        # the loop hangs: another connection holds the write lock, the reader's next write
        # waits for it (busy_timeout), so its loop stops and so do the pings
        con = sqlite3.connect(data / "mash.db", isolation_level=None)
        con.execute("BEGIN IMMEDIATE")
        board.emit_reading(reading(1))
        wait_for(lambda: time.monotonic() - notify_socket.last("WATCHDOG=1") > 3.0, timeout=20,
                 what="the pings to stop while the loop hangs")
        con.execute("COMMIT")
        con.close()
        hung_at = notify_socket.last("WATCHDOG=1")
        wait_for(lambda: notify_socket.last("WATCHDOG=1") > hung_at, timeout=20,
                 what="the pings to resume")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        stop_process(proc)
    assert "STOPPING=1" in notify_socket.drain()
    store = Store(data / "mash.db", readonly=True)
    assert store.m.SensorData.select().count() == 2      # the reading it hung on: stored


def test_worker_says_ready_and_pings_the_watchdog(tmp_path, notify_socket):
    env = dict(os.environ, MASH_DATA_DIR=str(tmp_path / "data"), PYTHONPATH=str(ROOT),
               **notify_socket.env(watchdog_s=1.0))
    proc = subprocess.Popen([sys.executable, "-m", "mash.worker"], env=env, cwd=str(tmp_path))
    try:
        ready_then_watchdog(notify_socket, proc, "the worker")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        stop_process(proc)
    assert "STOPPING=1" in notify_socket.drain()


def test_dashboard_says_ready_and_pings_while_it_serves(tmp_path, notify_socket):
    env = dict(os.environ, MASH_DATA_DIR=str(tmp_path / "data"), PYTHONPATH=str(ROOT),
               DASHBOARD_PORT=str(free_port()), **notify_socket.env(watchdog_s=1.0))
    proc = subprocess.Popen([sys.executable, "-m", "mash.dashboard"], env=env, cwd=str(tmp_path))
    try:
        ready_then_watchdog(notify_socket, proc, "the dashboard")
    finally:
        stop_process(proc)


# -- a corrupt store ---------------------------------------------------------------------------
def corrupt(path) -> bytes:
    """Garbage over the whole file, as a torn write on a dying SD card leaves it."""
    garbage = os.urandom(path.stat().st_size)
    path.write_bytes(garbage)
    for suffix in ("-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    return garbage


def set_aside(data):
    return sorted(p for p in data.glob("mash.db.corrupt-*") if not p.name.endswith(("-wal", "-shm")))


def test_corrupt_store_is_set_aside_once_and_readings_are_stored_again_within_30_s(tmp_path):
    data = tmp_path / "data"
    old = Store(data / "mash.db")
    old.save_sensor_data(reading(0))
    old_uid = old.uid
    old.close()
    garbage = corrupt(data / "mash.db")
    board = SimulatedBoard(interval=0.5, link=tmp_path / "ttyMASH", seed=2).start()
    env = dict(os.environ, MASH_DATA_DIR=str(data), SERIAL_PORT=board.port, CLOCK_SYNC="trust",
               DASHBOARD_PORT=str(free_port()), PYTHONPATH=str(ROOT))
    log = open(tmp_path / "gateway.log", "ab")
    procs = []
    try:
        # all three at once, as systemd starts them at boot
        procs = [subprocess.Popen([sys.executable, "-m", m], env=env, cwd=str(tmp_path),
                                  stdout=log, stderr=log)
                 for m in ("mash.reader", "mash.worker", "mash.dashboard")]

        def readings():
            try:
                s = Store(data / "mash.db", readonly=True)
                return s.last_reading_id()
            except Exception:
                return 0
        # the done-when: readings stored again within 30 s
        wait_for(lambda: readings() > 0, timeout=30, what="readings stored in the fresh store")
        assert [p.poll() for p in procs] == [None, None, None]
    finally:
        for p in procs:
            stop_process(p, timeout=20)
        board.stop()
    aside = set_aside(data)
    assert len(aside) == 1                               # exactly one process moved it
    assert aside[0].read_bytes() == garbage              # kept as it was
    fresh = Store(data / "mash.db", readonly=True)
    assert fresh.uid != old_uid
    A = fresh.m.Alert
    alerts = list(A.select().where(A.event_type == "store_corrupt"))
    assert [(a.severity, a.state) for a in alerts] == [("CRITICAL", "raised")]
    assert aside[0].name in alerts[0].message
    assert "Traceback" not in (tmp_path / "gateway.log").read_text()


def test_processes_finding_a_corrupt_store_at_once_set_it_aside_exactly_once(tmp_path):
    data = tmp_path / "data"
    Store(data / "mash.db").close()
    corrupt(data / "mash.db")
    code = ("import sys; from mash.models import Store; "
            "s = Store(sys.argv[1]); s.save_sensor_data({'fruiting': {'temp': 1, 'humidity': 2, "
            "'co2': 3}}); print(s.uid)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(data / "mash.db")], cwd=str(ROOT),
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    uids = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0]
    assert len(set(uids)) == 1                            # all on the one fresh store
    assert len(set_aside(data)) == 1
    fresh = Store(data / "mash.db", readonly=True)
    assert fresh.m.SensorData.select().count() == 4
    A = fresh.m.Alert
    assert A.select().where(A.event_type == "store_corrupt").count() == 1


def test_an_open_store_follows_when_another_process_sets_its_file_aside(tmp_path):
    data = tmp_path / "data"
    mine = Store(data / "mash.db")
    mine.save_sensor_data(reading(0))
    old_uid = mine.uid
    corrupt(data / "mash.db")
    subprocess.run([sys.executable, "-c", "import sys; from mash.models import Store; "
                    "Store(sys.argv[1])", str(data / "mash.db")], cwd=str(ROOT), check=True,
                   timeout=60)
    mine.save_sensor_data(reading(1))                    # this process's next write
    assert mine.uid != old_uid
    fresh = Store(data / "mash.db", readonly=True)
    assert fresh.uid == mine.uid
    assert [r.co2 for r in fresh.m.SensorData.select().where(
        fresh.m.SensorData.room == "fruiting")] == [401]


# -- read-only commands --------------------------------------------------------------------------
@pytest.mark.parametrize("command", [["status"], ["export"], ["doctor"]])
def test_status_export_and_doctor_on_a_missing_store_create_nothing(tmp_path, run_cli, command):
    data = tmp_path / "data"
    data.mkdir()
    done = run_cli(*command, env={"MASH_DATA_DIR": str(data), "MASH_ENV_FILE": str(tmp_path / "none")})
    assert list(data.iterdir()) == []
    assert "Traceback" not in done.stderr
    assert done.returncode == 1
    assert f"no store at {data / 'mash.db'}" in done.stdout + done.stderr


def test_doctor_reports_a_corrupt_store_instead_of_crashing(tmp_path, run_cli):
    data = tmp_path / "data"
    Store(data / "mash.db").close()
    garbage = corrupt(data / "mash.db")
    done = run_cli("doctor", env={"MASH_DATA_DIR": str(data), "MASH_ENV_FILE": str(tmp_path / "none")})
    assert "Traceback" not in done.stderr + done.stdout
    assert done.returncode == 1
    line = next(x for x in done.stdout.splitlines() if "store integrity" in x)
    assert line.startswith("✗") and "file is not a database" in line and "sets a corrupt store aside" in line
    assert (data / "mash.db").read_bytes() == garbage    # doctor only looks
    assert set_aside(data) == []


def test_a_store_found_malformed_at_a_query_is_set_aside_and_the_next_write_goes_to_a_fresh_one(
        tmp_path):
    data = tmp_path / "data"
    old = Store(data / "mash.db")
    S = old.m.SensorData
    now = datetime.datetime(2026, 11, 1)
    with old.transaction():
        for start in range(0, 20000, 1000):
            S.insert_many([dict(room="fruiting", temperature=24.0, humidity=85.0, co2=i,
                                timestamp=now, fb_key=f"k{i}")
                           for i in range(start, start + 1000)]).execute()
    old.close()
    path = data / "mash.db"
    size = path.stat().st_size
    with open(path, "r+b") as f:                          # the header and schema intact,
        f.seek(size // 2)                                 # the readings' pages torn
        f.write(os.urandom(size // 3))
    store = Store(path)                                   # opens: page 1 reads fine
    with pytest.raises(Exception, match="malformed"):
        store.m.SensorData.select().where(store.m.SensorData.co2 > 0).count()
    store.save_sensor_data(reading(7))                    # the next statement: the fresh file
    assert len(set_aside(data)) == 1
    fresh = Store(path, readonly=True)
    assert [r.co2 for r in fresh.m.SensorData.select()] == [407, 900]
    A = fresh.m.Alert
    assert A.select().where(A.event_type == "store_corrupt").count() == 1


def test_status_never_migrates_a_store(tmp_path, run_cli):
    data = tmp_path / "data"
    Store(data / "mash.db").close()
    with sqlite3.connect(data / "mash.db") as con:
        con.execute("PRAGMA user_version = 3")            # as an older gateway left it
    done = run_cli("status", env={"MASH_DATA_DIR": str(data), "MASH_ENV_FILE": str(tmp_path / "none")})
    assert done.returncode == 1
    assert "has schema v3" in done.stderr and "start the reader (it migrates it)" in done.stderr
    with sqlite3.connect(data / "mash.db") as con:
        assert con.execute("PRAGMA user_version").fetchone()[0] == 3
