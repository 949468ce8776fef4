"""mDNS on the farm's network, for real, inside two network namespaces this test makes: the
dashboard process (which owns the advertiser) in one, a zeroconf browser in the other (the
grower app's way of resolving, ``tests/lan_peer.py``). It finds ``_mash-iot._tcp`` with
CONTRACT §10's TXT keys and the gateway's address; a new address is seen within 10 s; a
stopped gateway is withdrawn (its goodbyes), as is the dashboard's ``_http._tcp``."""
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest

from mash.doctor import Doctor
from mash.models import Store
from tests.services import ROOT, lan_pair_or_skip, stop_process, wait_for

SERIAL = "MASH-B2-CAL26-CE637C"
SID = "mash-b2-cal26-ce637c"
PASSWORD = "mushrooms-in-the-lan"


@pytest.fixture
def lan():
    pair = lan_pair_or_skip()
    yield pair
    pair.stop()


class Lines:
    """A subprocess's JSON lines, read on a thread, waited for by predicate."""

    def __init__(self, proc):
        self.proc, self.q, self.seen = proc, queue.Queue(), []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.q.put(json.loads(line))
            except ValueError:
                pass

    def wait(self, predicate, timeout, what):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                item = self.q.get(timeout=max(0.05, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.seen.append(item)
            if predicate(item):
                return item
        raise AssertionError(f"no {what} within {timeout} s; saw {self.seen}")


def test_mdns_advertises_follows_the_address_and_withdraws(lan, tmp_path, make_settings):
    data = tmp_path / "data"
    env = {**os.environ, "MASH_DATA_DIR": str(data), "DEVICE_ID": SERIAL,
           "DEVICE_NAME": "Shed 2", "MDNS": "1", "PHONE_API": "control",
           "PHONE_API_HOST": "0.0.0.0",
           "PHONE_API_PORT": "5000", "DASHBOARD_HOST": "0.0.0.0", "DASHBOARD_PORT": "8080"}
    # the dashboard listens beyond loopback (so it is advertised too): that needs a password
    pw = subprocess.run([sys.executable, "-m", "mash", "dashboard", "set-password"],
                        input=f"{PASSWORD}\n{PASSWORD}\n", env={**env, "PYTHONPATH": str(ROOT)},
                        capture_output=True, text=True, timeout=60)
    assert pw.returncode == 0, pw.stderr
    log = open(tmp_path / "dashboard.log", "ab")
    browser = lan.popen(lan.ph, [str(ROOT / "tests" / "lan_peer.py"), "browse"], env,
                        stdout=subprocess.PIPE, stderr=log, text=True)
    gateway = None
    try:
        events = Lines(browser)
        events.wait(lambda e: e["event"] == "browsing", 20, "browser start")
        gateway = lan.popen(lan.gw, ["-m", "mash.dashboard"], env, stdout=log, stderr=log)

        lan_type = "_mash-iot._tcp.local."

        def mash_iot(e, event=("added", "updated")):
            return e["event"] in event and e["type"] == lan_type
        found = events.wait(mash_iot, 20, "the _mash-iot._tcp service")
        assert found["name"] == f"{SID}._mash-iot._tcp.local."
        assert found["server"] == f"{SID}.local."                  # a MASH serial: the contract's
        assert found["port"] == 5000
        assert found["addresses"] == [lan.GW]              # the private one, not 100.64/10
        assert found["properties"] == {"name": "Shed 2", "type": "rpi-gateway",
                                       "api_version": "v1", "device_id": SID,
                                       "manufacturer": "MASH", "port": "5000",
                                       "protocol": "http"}
        http = events.wait(lambda e: e["event"] in ("added", "updated")
                           and e["type"] == "_http._tcp.local.", 10, "the dashboard's _http._tcp")
        assert http["port"] == 8080 and http["server"] == f"{SID}.local."
        # what the dashboard says it advertises, for `mash doctor` and the pairing page
        reads = Store(data / "mash.db", readonly=True)
        state = wait_for(lambda: reads.meta_get("mdns.advertised"), what="mdns.advertised")
        assert state["addresses"] == [lan.GW] and state["host"] == f"{SID}.local"
        assert {s["name"] for s in state["services"]} == {
            f"{SID}._mash-iot._tcp.local.", f"Shed 2 ({SID})._http._tcp.local."}
        doc = Doctor()
        doc.settings = make_settings(MASH_DATA_DIR=str(data))
        line = doc.mdns()
        assert line.ok is True and line.detail == (
            f"{SID}._mash-iot._tcp.local. port 5000, Shed 2 ({SID})._http._tcp.local. port 8080 "
            f"on {SID}.local ({lan.GW})")

        # the Wi-Fi gives the Pi another address (DHCP): the phone sees it within 10 s
        new = "10.77.0.11"
        lan.ip("addr", "del", f"{lan.GW}/24", "dev", lan.veth_gw, ns=lan.gw)
        lan.ip("addr", "add", f"{new}/24", "dev", lan.veth_gw, ns=lan.gw)
        moved = events.wait(lambda e: mash_iot(e) and new in e["addresses"], 10,
                            f"the service on {new}")
        assert moved["addresses"][0] == new                 # the app takes the first
        # the old address could not say goodbye (it was gone); the new A record's cache-flush
        # bit drops it a second later (RFC 6762 §10.2): a fresh search finds only the new one
        time.sleep(1.5)
        fresh = lan.run(lan.ph, [str(ROOT / "tests" / "lan_peer.py"), "resolve", lan_type,
                                 found["name"]], env=env)
        assert json.loads(fresh.stdout)["addresses"] == [new], fresh.stderr

        # the gateway stops: both services withdrawn (goodbye packets, not a TTL running out)
        t0 = time.monotonic()
        gateway.send_signal(signal.SIGTERM)
        gone = set()
        while gone != {"_mash-iot._tcp.local.", "_http._tcp.local."}:
            gone.add(events.wait(lambda e: e["event"] == "removed", 15, "withdrawal")["type"])
        assert time.monotonic() - t0 < 15
        assert gateway.wait(15) == 0
    finally:
        stop_process(gateway)
        stop_process(browser)
        log.close()
    text = (tmp_path / "dashboard.log").read_text()
    assert "Traceback" not in text, text[-3000:]
    assert "mDNS: addresses changed" in text


def test_mdns_off_advertises_nothing_and_doctor_says_so(make_settings, data_dir, store):
    env = {"MASH_DATA_DIR": str(data_dir), "MDNS": "0", "MASH_ENV_FILE": "/dev/null"}
    doc = Doctor(env=env)
    doc.settings = make_settings(MDNS="0")
    assert doc.mdns().ok is None and "MDNS=0" in doc.mdns().detail
    doc.settings = make_settings()
    check = doc.mdns()                       # on, but no dashboard has advertised anything
    assert check.ok is None and "not advertised now" in check.detail
