"""No fake data in the cloud: `mash run` with a sink configured and no board refuses the
simulated board; a simulated board's readings are marked, kept local (sync status LOCAL)
and reach no sink (backend, Firebase, live MQTT) unless SIM_SYNC=1; auto-detect opens only
a port whose USB vendor is a MASH board's."""
import os
import signal
import subprocess
import sys

import pytest
from serial.tools.list_ports_common import ListPortInfo

from mash import export
from mash.models import LOCAL, PENDING, Store
from mash.reader import find_board, pick_board
from tests.services import ROOT, wait_for, whole_stack

DEVICE = "rpi_gateway_001"
REAL = {"fruiting": {"temp": 24.0, "humidity": 88.0, "co2": 800}}


def port(device, vid=None, pid=None):
    """A port as pyserial's list_ports describes it (its own data class, filled in)."""
    info = ListPortInfo(device, skip_link_detection=True)
    info.vid, info.pid = vid, pid
    return info


def test_auto_detect_opens_only_a_known_board_vendor():
    modem, gps = port("/dev/ttyACM0", 0x1546, 0x01A8), port("/dev/ttyUSB0", 0x067B, 0x2303)
    uart, cp210x = port("/dev/ttyS0"), port("/dev/ttyUSB1", 0x10C4, 0xEA60)
    assert pick_board([modem, gps, uart, cp210x]) is None          # no vendor of ours
    assert pick_board([]) is None
    assert pick_board([modem, port("/dev/ttyUSB3", 0x1A86, 0x7523)]) == "/dev/ttyUSB3"   # CH340
    assert pick_board([modem, port("/dev/ttyUSB2", 0x0403, 0x6001)]) == "/dev/ttyUSB2"   # FTDI
    # an Arduino's own vendor first, then the lowest path
    ports = [port("/dev/ttyUSB0", 0x1A86, 0x7523), port("/dev/ttyACM1", 0x2341, 0x0043),
             port("/dev/ttyACM0", 0x2A03, 0x0043), modem]
    assert pick_board(ports) == "/dev/ttyACM1"
    assert pick_board(ports[2:]) == "/dev/ttyACM0"


def test_mash_run_with_a_cloud_and_no_board_refuses_and_sends_nothing(tmp_path, fresh_broker):
    assert find_board() is None, "this test needs a machine with no Arduino/CH340/FTDI attached"
    observer = fresh_broker.observer(topics=("#",))
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if k != "SERIAL_PORT"}
    env.update(fresh_broker.env(), MASH_DATA_DIR=str(data), PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "mash", "run", "--interval", "0.2"], env=env,
                            cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)         # the group this test started
        proc.communicate(timeout=30)
        pytest.fail("mash run started without a board while MQTT is configured")
    try:
        assert proc.returncode == 2
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith("mash run: no Arduino attached and MQTT configured: not "
                                   f"starting the simulated board, whose readings would go out as "
                                   f"DEVICE_ID={DEVICE}")
        assert "SERIAL_PORT=sim" in lines[0] and out == ""
        assert not (data / "mash.db").exists()
        # everything published before our own marker has reached the observer by now
        observer.publish("barrier/done", {"n": 1})
        wait_for(lambda: observer.on("barrier/done"), timeout=10, what="the barrier message")
        assert [t for t, _, _ in observer.messages if t != "barrier/done"] == []
    finally:
        observer.close()


def test_simulated_rows_are_local_and_hold_no_marker(store, tmp_path):
    real = store.save_sensor_data(dict(REAL))
    store.mark_synced(real)
    store.sink_ok("firebase", progress=real[-1])
    sim = store.save_sensor_data({"fruiting": {"temp": 30.0, "humidity": 50.0, "co2": 400},
                                  "spawning": {"temp": 27.0, "humidity": 70.0, "co2": 900}},
                                 simulated=True)
    S = store.m.SensorData
    assert [(r.simulated, r.synced) for r in S.select().where(S.id.in_(sim))] == [(1, LOCAL)] * 2
    # never owed, and no marker waits behind them
    assert store.pending_count() == 0 and store.unsynced(100) == []
    assert store.readings_after(0, 100) == [S.get_by_id(real[0])]
    assert store.backend_progress() == sim[-1] and store.sink("firebase").progress == sim[-1]
    stats = store.get_stats()
    assert (stats["local_records"], stats["pending_records"], stats["firebase_lag_records"]) == (2, 0, 0)
    # a real reading after them is owed to every sink, alone
    after = store.save_sensor_data(dict(REAL))
    assert [r.id for r in store.unsynced(100)] == after and store.pending_count() == 1
    assert [r.id for r in store.readings_after(sim[-1], 100)] == after
    store.mark_synced(after)
    assert store.backend_progress() == after[0]
    # SIM_SYNC=1: marked, and sent like any other
    sent = store.save_sensor_data(dict(REAL), simulated=True, sim_sync=True)
    assert (S.get_by_id(sent[0]).simulated, S.get_by_id(sent[0]).synced) == (1, PENDING)
    assert [r.id for r in store.unsynced(100)] == sent
    statuses = {r["reading_id"]: r["sync_status"] for r in export.rows(store)}
    assert statuses[store.reading_id(sim[0])] == "local"
    assert statuses[store.reading_id(real[0])] == "synced"
    firebase = {r["reading_id"]: r["firebase"] for r in export.rows(store)}
    assert firebase[store.reading_id(sim[0])] is False and firebase[store.reading_id(real[0])] is True
    # retention may delete local rows like synced ones
    state = store.enforce_budget(1)
    assert state["deleted"] == 4                      # real, sim x2, after; never the newest
    assert [r.synced for r in S.select()] == [PENDING]


def sim_gateway(base, sim_sync):
    """The whole stack, its reader on its own simulated board (SERIAL_PORT=sim)."""
    return whole_stack(base, SERIAL_PORT="sim", SIM_SYNC=sim_sync)


def rows_of(store, simulated):
    S = store.m.SensorData
    return list(S.select().where(S.simulated == simulated).order_by(S.id))


@pytest.mark.parametrize("sim_sync", ["0", "1"])
def test_simulated_readings_reach_no_sink_unless_sim_sync(tmp_path, sim_sync):
    with sim_gateway(tmp_path, sim_sync) as gw:
        observer = gw.broker.observer()
        try:
            db = gw.data / "mash.db"
            wait_for(db.exists, timeout=30, what="the store")
            store = Store(db)
            wait_for(lambda: store.processes().get("worker", {}).get("alive") and
                     store.sink("mqtt").online, timeout=60, what="the worker up, MQTT online")
            wait_for(lambda: len(rows_of(store, 1)) >= 2, timeout=30, what="simulated readings")
            sent_ids = lambda: set(gw.devserver.state(DEVICE)["reading_ids"])   # noqa: E731
            live_ids = lambda: {m["readingId"] for m in observer.on(f"{DEVICE}/sensor_data")}  # noqa: E731

            def firebase_keys():
                with gw.rtdb.lock:
                    tree = gw.rtdb.tree.get("sensor_data", {})
                    return {k for room in tree.values() for k in room}

            if sim_sync == "1":
                first = rows_of(store, 1)[0]
                wait_for(lambda: store.reading_id(first.id) in sent_ids(), timeout=60,
                         what="a simulated reading at the backend")
                wait_for(lambda: first.fb_key in firebase_keys(), timeout=60, what="... in Firebase")
                wait_for(lambda: live_ids() & {store.reading_id(r.id) for r in rows_of(store, 1)},
                         timeout=60, what="... on the live MQTT feed")
                assert rows_of(store, 0) == []
                return
            # A real reading after the simulated ones: once every sink has it, each has been
            # through everything before it, and must hold nothing else.
            real = store.save_sensor_data(dict(REAL))[0]
            real_id, real_key = store.reading_id(real), store.m.SensorData.get_by_id(real).fb_key
            wait_for(lambda: real_id in sent_ids(), timeout=60, what="the real reading at the backend")
            wait_for(lambda: real_key in firebase_keys(), timeout=60, what="... in Firebase")
            wait_for(lambda: real_id in live_ids(), timeout=60, what="... on the live MQTT feed")
            assert sent_ids() == {real_id}
            assert firebase_keys() == {real_key}
            assert live_ids() == {real_id}
            sims = rows_of(store, 1)
            assert len(sims) >= 2 and {r.synced for r in sims} == {LOCAL}
            stats = store.get_stats()
            assert stats["pending_records"] == 0 and stats["local_records"] == len(sims)
        finally:
            observer.close()
