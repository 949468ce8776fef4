"""The ``mash`` command as a user runs it: a subprocess in a clean working directory."""
import json
import os
import signal
import subprocess
import sys

import pytest
from huey import SqliteHuey

from mash.config import Settings
from mash.models import LOCAL, Store
from tests.services import ROOT, wait_for


@pytest.mark.parametrize("env", [{"BATCH_SIZE": "abc"}, {"SYNC_INTERVAL": "0"}, {"MQTT_PORT": "99999"},
                                 {"ALERT_THRESHOLDS": '{"cellar":{}}'}])
def test_cli_refuses_bad_config_with_one_line_and_exit_2(run_cli, env):
    result = run_cli("status", env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("configuration error: ")
    assert "Traceback" not in result.stderr


def test_status_json_on_a_fresh_store(run_cli, tmp_path):
    Store(tmp_path / "d" / "mash.db").close()          # what the reader makes at its start
    result = run_cli("status", "--json", env={"MASH_DATA_DIR": str(tmp_path / "d")})
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["pending_records"] == 0 and stats["backend_online"] is False


def test_sync_enqueues_a_forced_sync_on_the_workers_queue(run_cli, tmp_path):
    data = tmp_path / "d"
    result = run_cli("sync", env={"MASH_DATA_DIR": str(data)})
    assert result.returncode == 0 and "sync enqueued (0 readings pending)" in result.stderr
    queue = SqliteHuey("mash", filename=str(Settings.from_mapping({"MASH_DATA_DIR": str(data)}).queue_path))
    items = list(queue.storage.enqueued_items())      # raw: this process has no task registry
    assert len(items) == 1 and b"force_sync" in items[0]


def test_run_stores_simulated_readings_and_stops_cleanly_on_ctrl_c(tmp_path):
    data = tmp_path / "data"
    env = dict(os.environ, MASH_DATA_DIR=str(data), PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "mash", "run", "--interval", "0.2"], env=env,
                            cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        wait_for(lambda: (data / "mash.db").exists(), timeout=30, what="the store")
        store = Store(data / "mash.db")
        S = store.m.SensorData
        # marked as the simulated board's (mash run passed the marker) and kept local
        local = S.select().where((S.simulated == 1) & (S.synced == LOCAL))
        wait_for(lambda: local.count() >= 6, timeout=30, what="simulated readings stored")
        assert store.pending_count() == 0 and S.select().where(S.simulated == 0).count() == 0
        # stopped only once the worker is up too: a worker still starting logs no stop
        wait_for(lambda: store.processes().get("worker", {}).get("alive"), timeout=30,
                 what="the worker's heartbeat")
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out[-2000:]
    assert "no Arduino attached: simulated board on" in out
    assert "reader stopped" in out and "worker stopped" in out


def test_status_tells_unconfigured_sinks_and_a_dead_worker_apart(run_cli, tmp_path):
    """An absent sink is "off (not configured)", not "offline"; a worker that stopped beating
    is not shown as online anywhere, whatever its last flags said."""
    data = tmp_path / "d"
    store = Store(data / "mash.db")
    store.sink_ok("backend")                    # the worker's last word: online
    store.meta_set("process.worker", {"at": "2026-01-01T00:00:00.000Z", "pid": 1, "every": 60})
    store.beat("reader", 60, board={"connected": True, "since": "2026-11-27T10:00:00.000Z",
                                    "port": "/dev/ttyACM0", "problem": None})
    env = {"MASH_DATA_DIR": str(data), "BACKEND_URL": "http://127.0.0.1:9",
           "DEVICE_EMAIL": "d@x", "DEVICE_PASSWORD": "p"}
    stats = json.loads(run_cli("status", "--json", env=env).stdout)
    assert stats["sinks"] == {"backend": "unknown (worker not running)",
                              "mqtt": "off (not configured)", "firebase": "off (not configured)"}
    assert stats["backend_online"] is False
    assert stats["processes"]["reader"]["alive"] and not stats["processes"]["worker"]["alive"]
    text = run_cli("status", env=env).stdout
    assert "worker:   not running" in text and "reader:   running" in text
    assert "board:    connected on /dev/ttyACM0" in text
    assert "mqtt:     off (not configured)" in text
