"""Real processes end to end: simulated board pty -> reader.py -> store -> huey_consumer
mash.tasks.huey -> reference backend + mosquitto + RTDB stand-in."""
import json
import os
import signal
import subprocess
import sys
import time

from mash.models import Store
from mash.simulator import SimulatedBoard
from tests.services import ROOT, wait_for

DEVICE = "rpi_gateway_001"


def test_board_to_cloud_and_command_back_with_real_processes(tmp_path, devserver, broker, rtdb, observer):
    data = tmp_path / "data"
    board = SimulatedBoard(interval=0.2, link=tmp_path / "ttyMASH", seed=7).start(banner=False)
    env = dict(os.environ, **devserver.env(), **broker.env(), MASH_DATA_DIR=str(data),
               SERIAL_PORT=board.port, FIREBASE_DATABASE_URL="https://mash-test.firebaseio.com",
               FIREBASE_CREDENTIALS=str(rtdb.credentials), SYNC_INTERVAL="3600", CONTROL_MODE="off",
               COMMAND_POLL_INTERVAL="2", HEARTBEAT_INTERVAL="2", PYTHONPATH=str(ROOT))
    logs = open(tmp_path / "processes.log", "ab")
    reader = subprocess.Popen([sys.executable, str(ROOT / "reader.py")], env=env, cwd=str(tmp_path),
                              stdout=logs, stderr=logs)
    worker = subprocess.Popen([sys.executable, "-m", "huey.bin.huey_consumer", "mash.tasks.huey",
                               "-w", "2", "-k", "thread", "-d", "0.01", "-m", "0.1", "-f"],
                              env=env, cwd=str(tmp_path), stdout=logs, stderr=logs)
    try:
        store = Store(data / "mash.db")
        # readings reach the store and, live, the MQTT subscriber
        wait_for(lambda: store.m.SensorData.select().count() >= 10, timeout=20, what="readings stored")
        wait_for(lambda: len(observer.on(f"{DEVICE}/sensor_data")) >= 3, timeout=20, what="live MQTT")
        # the worker registered the device and ran its start-up sync; SYNC_INTERVAL is an
        # hour, so from here on only `mash sync` uploads
        wait_for(lambda: devserver.state()["devices"], timeout=20, what="device registered")
        # a set_actuator command, known to the backend, published on MQTT
        cmd = devserver.issue(DEVICE, "set_actuator", {"actuator": "MIST_MAKER", "state": "ON"}, id="e2e-1")
        observer.publish(f"devices/{DEVICE}/commands", {"id": "e2e-1", "command": "set_actuator",
                                                         "parameters": cmd["parameters"]})
        wait_for(lambda: board.actuators["MIST_MAKER"] == "ON", timeout=10, what="relay switched")
        wait_for(lambda: [a for a in observer.on(f"{DEVICE}/command_ack") if a["id"] == "e2e-1"],
                 timeout=15, what="MQTT ack")
        wait_for(lambda: [c for c in devserver.state()["commands"]
                          if c["id"] == "e2e-1" and c["status"] == "completed"], timeout=15, what="backend ack")
        # `mash sync` from a shell triggers the sync
        before = devserver.state()["readings"].get(DEVICE, 0)
        wait_for(lambda: store.pending_count() >= 10, timeout=20, what="a backlog")
        out = subprocess.run([sys.executable, "-m", "mash", "sync"], env=env, cwd=str(tmp_path),
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        wait_for(lambda: devserver.state()["readings"].get(DEVICE, 0) >= before + 10, timeout=20,
                 what="forced sync")
        # stop the board, drain everything, and check every reading arrived exactly once
        board.interval = 0
        time.sleep(0.5)
        out = subprocess.run([sys.executable, "-m", "mash", "sync", "--wait", "--timeout", "60"], env=env,
                             cwd=str(tmp_path), capture_output=True, text=True, timeout=90)
        assert out.returncode == 0 and "backlog drained" in out.stderr, out.stderr
        status = subprocess.run([sys.executable, "-m", "mash", "status", "--json"], env=env,
                                cwd=str(tmp_path), capture_output=True, text=True, timeout=30)
        stats = json.loads(status.stdout)
        assert stats["pending_records"] == 0 and stats["backend_online"] and stats["mqtt_online"]
        ours = {store.reading_id(r.id) for r in store.m.SensorData.select(store.m.SensorData.id)}
        theirs = devserver.state(DEVICE)["reading_ids"]
        assert len(theirs) == len(set(theirs)) and set(theirs) == ours
        wait_for(lambda: store.get_stats()["firebase_lag_records"] == 0, timeout=20, what="firebase")
        tree = rtdb.tree["sensor_data"]
        assert sum(len(v) for v in tree.values()) == len(ours)
        assert [c["acks"] for c in devserver.state()["commands"] if c["id"] == "e2e-1"] == [1]
        assert len([a for a in observer.on(f"{DEVICE}/command_ack") if a["id"] == "e2e-1"]) == 1
        assert board.received.count(b'{"actuator":"MIST_MAKER","state":"ON"}') == 1
    finally:
        for p in (reader, worker):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in (reader, worker):
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        board.stop()
    assert reader.returncode == 0
    text = (tmp_path / "processes.log").read_text()
    print(text)
    assert "Traceback" not in text, text[-3000:]
