"""The reference backend: faithful where the contract speaks, strict where it is silent."""
import subprocess
import sys

import requests

from tests.test_backend_api import DEVICE, reading


def test_devserver_rejects_what_the_backend_would(devserver, client_for):
    backend = client_for(devserver)
    backend.register_device()
    token = backend._ensure_token()
    h = {"Authorization": f"Bearer {token}"}
    url = devserver.url
    cases = [
        ("post", "/sensors/data", {"deviceId": DEVICE, "readings": [reading("x")]}, {}, 400),   # no key
        ("post", "/sensors/data", {"deviceId": DEVICE, "readings": []}, {"Idempotency-Key": "k"}, 400),
        ("post", "/sensors/data", {"deviceId": DEVICE, "readings": [reading("x", co2="812")]},
         {"Idempotency-Key": "k"}, 400),
        ("post", "/sensors/data", {"deviceId": DEVICE, "readings": [reading("x", timestamp="yesterday")]},
         {"Idempotency-Key": "k"}, 400),
        ("post", "/sensors/data", {"deviceId": "ghost", "readings": [reading("x")]}, {"Idempotency-Key": "k"}, 404),
        ("put", f"/devices/{DEVICE}", {"status": "SLEEPING"}, {}, 400),
        ("post", "/alerts/trigger", {"eventType": "x", "severity": "LOUD", "message": "m", "deviceId": DEVICE}, {}, 400),
        ("put", f"/devices/{DEVICE}/commands/nope", {"status": "completed", "acknowledgedAt": "2026-01-01T00:00:00Z"}, {}, 404),
        ("post", "/devices", {"name": "x", "type": "TOASTER", "serialNumber": "s"}, {}, 400),
    ]
    for method, path, body, extra, status in cases:
        r = getattr(requests, method)(url + path, json=body, headers={**h, **extra}, timeout=5)
        assert r.status_code == status, (path, body, r.text)
        assert r.json()["success"] is False and r.json()["error"]["message"]
    r = requests.get(url + f"/devices/{DEVICE}/commands", timeout=5)
    assert r.status_code == 401


def test_devserver_refuses_to_listen_beyond_loopback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mash", "devserver", "--host", "0.0.0.0",
                          "--db", str(tmp_path / "d.db")], capture_output=True, text=True,
                         timeout=30, cwd=str(tmp_path))
    assert out.returncode == 2 and "loopback only" in out.stdout


def test_a_pending_command_is_marked_sent_when_the_device_fetches_it(devserver, client_for):
    backend = client_for(devserver)
    backend.register_device()
    devserver.issue(DEVICE, "force_sync", id="f-1")
    assert [c["status"] for c in devserver.state()["commands"] if c["id"] == "f-1"] == ["pending"]
    assert [c["status"] for c in backend.fetch_commands() if c["id"] == "f-1"] == ["sent"]
    assert [c["status"] for c in devserver.state()["commands"] if c["id"] == "f-1"] == ["sent"]
