"""The guide's integration example runs as written against real servers."""
import json
import os
import subprocess
import sys

from tests.services import ROOT, wait_for

DEVICE = "rpi_gateway_001"


def test_guide_integration_example_runs_as_written(tmp_path, devserver, broker, rtdb, observer):
    env = dict(os.environ, **devserver.env(), **broker.env(), MASH_DATA_DIR=str(tmp_path / "data"),
               FIREBASE_DATABASE_URL="https://mash-test.firebaseio.com",
               FIREBASE_CREDENTIALS=str(rtdb.credentials), COMMAND_POLL_INTERVAL="1",
               PYTHONPATH=str(ROOT))
    # The device must exist before a command can be queued for it.
    from mash.cloud.backend_api import BackendAPIClient
    from mash.config import Settings
    BackendAPIClient(Settings.from_mapping({**devserver.env(), "MASH_DATA_DIR": str(tmp_path)})).register_device()
    devserver.issue(DEVICE, "set_actuator", {"actuator": "MIST_MAKER", "state": "ON"}, id="guide-cmd-1")
    proc = subprocess.run([sys.executable, str(ROOT / "tests/scripts/guide_integration.py"), "1"],
                          env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(proc.stderr[-4000:])
    assert result["executed"] == ["guide-cmd-1"]
    assert result["pending_records"] == 0 and result["total_synced"] == 40
    assert result["alerts_pending"] == 0 and result["commands_unacked"] == 0
    state = devserver.state(DEVICE)
    assert state["readings"] == {DEVICE: 40}
    assert [c for c in state["commands"] if c["id"] == "guide-cmd-1"][0]["status"] == "completed"
    assert len([a for a in state["alerts"] if a["eventType"] == "high_co2"]) == 5    # co2 1550..1750
    live = wait_for(lambda: len(observer.on(f"{DEVICE}/sensor_data")) >= 20, what="live readings")
    assert live
    acks = observer.on(f"{DEVICE}/command_ack")
    assert [a["id"] for a in acks] == ["guide-cmd-1"] and acks[0]["status"] == "completed"
    assert len(rtdb.tree["sensor_data"]["fruiting"]) + len(rtdb.tree["sensor_data"]["spawning"]) == 40
