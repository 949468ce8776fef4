"""The reference backend: faithful where the contract speaks, strict where it is silent."""
import subprocess
import sys
import time

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


def test_fault_switches_refuse_credentials_for_a_while_and_chosen_readings(devserver, client_for):
    backend = client_for(devserver)
    backend.register_device()
    h = {"Authorization": f"Bearer {backend._ensure_token()}", "Idempotency-Key": "k1"}
    url = devserver.url
    devserver.faults(refuse_ids=["bad-1"], refuse_value=4999)
    for bad in (reading("bad-1"), reading("ok-1", co2=4999)):
        r = requests.post(url + "/sensors/data", json={"deviceId": DEVICE,
                          "readings": [reading("ok-0"), bad]}, headers=h, timeout=5)
        assert r.status_code == 400 and f"readings[1] (id {bad['id']}) refused" in \
            r.json()["error"]["message"]
    devserver.faults(max_readings=1)
    r = requests.post(url + "/sensors/data", json={"deviceId": DEVICE, "readings": [
        reading("ok-0"), reading("ok-2")]}, headers=h, timeout=5)
    assert r.status_code == 413
    assert devserver.state()["uploads"] == [[2, 400], [2, 400], [2, 413]]
    devserver.faults(unauthorized_for=1.0, unauthorized_after=1)
    assert requests.get(url + f"/devices/{DEVICE}/configuration", headers=h, timeout=5).ok
    login = {"email": devserver.EMAIL, "password": devserver.PASSWORD}
    assert requests.post(url + "/auth/login", json=login, timeout=5).status_code == 401
    assert requests.get(url + f"/devices/{DEVICE}/configuration", headers=h,
                        timeout=5).status_code == 401
    assert devserver.state()["faults"]["unauthorized"] == ["POST /auth/login",
                                                           f"GET /devices/{DEVICE}/configuration"]
    deadline = time.monotonic() + 10
    while requests.post(url + "/auth/login", json=login, timeout=5).status_code == 401:
        assert time.monotonic() < deadline, "the 401s did not end"
        time.sleep(0.1)
    assert devserver.state()["faults"]["unauthorized_for"] == 0
