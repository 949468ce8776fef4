"""``mash update`` / ``RESTART`` on a real ``mash run`` (simulated board, real processes), laid
out as releases: release 0.1.0 is this test environment copied (the same copy the updater
makes), and the wheels are built from this checkout with a bumped version, once per module,
offline (``--no-build-isolation``, ``PIP_NO_INDEX``): nothing downloads."""
import hashlib
import http.server
import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mash import releases
from tests.services import free_port, stop_process, wait_for
from tests.test_install import fresh_copy

WINDOW = 5          # UPDATE_HEALTH_WINDOW, s


def build_wheel(tmp: Path, version: str, reader_exits: bool = False) -> Path:
    tree = fresh_copy(tmp / f"src-{version}")
    init = tree / "mash" / "__init__.py"
    init.write_text(re.sub(r'__version__ = ".*"', f'__version__ = "{version}"', init.read_text()))
    if reader_exits:        # a release whose reader dies at start
        reader = tree / "mash" / "reader.py"
        reader.write_text(reader.read_text().replace(
            "def main(argv=None) -> int:\n",
            "def main(argv=None) -> int:\n    raise SystemExit('this release cannot read')\n", 1))
    out = tmp / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(tree)], check=True, capture_output=True,
                   env={**os.environ, "PIP_NO_INDEX": "1"})
    return next(out.glob(f"mash_gateway-{version}-*.whl"))


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheels")
    return {"good": build_wheel(tmp, "0.1.1"), "bad": build_wheel(tmp, "0.1.2", reader_exits=True),
            "next": build_wheel(tmp, "0.1.3")}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Farm:
    """A home laid out as releases, running ``current/bin/python -m mash run``."""

    def __init__(self, root: Path, **env):
        self.home = root / "home"
        releases.copy_env(Path(sys.prefix), self.home / "releases" / "0.1.0")
        releases.switch(self.home, self.home / "releases" / "0.1.0")
        self.db = self.home / "data" / "mash.db"
        self.env = {**os.environ, "MASH_HOME": str(self.home),
                    "MASH_DATA_DIR": str(self.home / "data"),
                    "MASH_QUEUE_DIR": str(root / "queue"), "SERIAL_PORT": "sim",
                    "DASHBOARD_PORT": str(free_port()), "UPDATE_HEALTH_WINDOW": str(WINDOW),
                    "HEARTBEAT_INTERVAL": "2", "PIP_NO_INDEX": "1", "PYTHONSAFEPATH": "1", **env}
        self.env.pop("VIRTUAL_ENV", None)
        self.log = open(root / "run.log", "wb")
        self.proc = None

    def python(self) -> str:
        return str(self.home / "current" / "bin" / "python")

    def start(self) -> "Farm":
        self.proc = subprocess.Popen([self.python(), "-m", "mash", "run", "--interval", "0.2"],
                                     env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(lambda: self.alive("0.1.0"), timeout=60, interval=0.3, what="services up")
        return self

    def mash(self, *args, timeout=180):
        return subprocess.run([self.python(), "-m", "mash", *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def beats(self) -> dict:
        try:
            con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)
            rows = con.execute("SELECT key, value FROM meta WHERE key LIKE 'process.%'").fetchall()
            con.close()
        except sqlite3.Error:
            return {}
        return {k.split(".", 1)[1]: json.loads(v) for k, v in rows}

    def alive(self, version: str) -> bool:
        b = self.beats()
        return all(b.get(n, {}).get("version") == version and not b[n].get("stopped")
                   for n in ("reader", "worker"))

    def readings(self) -> list:
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)
        rows = con.execute("SELECT id, room, timestamp FROM sensor_data ORDER BY id").fetchall()
        con.close()
        return rows

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc, timeout=30)
        self.log.close()


def assert_each_reading_once(farm: Farm, before: list) -> None:
    rows = farm.readings()
    assert set(before) <= set(rows)                                  # none lost
    keys = [(room, ts) for _, room, ts in rows]
    assert len(keys) == len(set(keys))                               # none twice


def test_update_switches_to_a_healthy_wheel_and_refuses_a_wrong_sha256(tmp_path, wheels):
    farm = Farm(tmp_path).start()
    try:
        # a wrong sha256: refused before anything is installed
        wrong = farm.mash("update", str(wheels["good"]), "--sha256", "0" * 64)
        assert wrong.returncode == 1 and "sha256 mismatch" in wrong.stderr, wrong.stderr
        assert sorted(p.name for p in (farm.home / "releases").iterdir()
                      if p.is_dir()) == ["0.1.0"]
        # a URL without one is refused too
        assert "needs its sha256" in farm.mash("update", "https://example.org/x.whl").stderr

        before = farm.readings()
        done = farm.mash("update", str(wheels["good"]), "--sha256", sha(wheels["good"]))
        assert done.returncode == 0, done.stdout + done.stderr
        assert "updated 0.1.0 -> 0.1.1" in done.stdout
        assert farm.mash("version").stdout.split()[0] == "0.1.1"
        assert farm.mash("--version").stdout.strip() == "mash 0.1.1"
        assert releases.current_version(farm.home) == "0.1.1" and farm.alive("0.1.1")
        n = len(farm.readings())
        wait_for(lambda: len(farm.readings()) > n + 3, timeout=30, what="readings on 0.1.1")
        assert_each_reading_once(farm, before)
        assert releases.State(farm.home).good == ["0.1.0", "0.1.1"]

        # an update killed between its switch and its verdict (a power cut): the next start
        # of the worker judges the release afresh and keeps it; only two good ones stay
        nxt = wheels["next"]
        killed = subprocess.Popen([farm.python(), "-m", "mash", "update", str(nxt), "--sha256",
                                   sha(nxt)], env=farm.env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        marker = farm.home / "releases" / releases.PENDING
        wait_for(marker.exists, timeout=60, what="the update's switch")
        time.sleep(0.5)
        killed.kill()
        killed.wait()
        assert farm.mash("restart").returncode == 0
        wait_for(lambda: not marker.exists(), timeout=60, what="the verdict")
        assert releases.State(farm.home).good == ["0.1.1", "0.1.3"]
        assert sorted(p.name for p in (farm.home / "releases").iterdir() if p.is_dir()) == \
            ["0.1.1", "0.1.3"]
        assert farm.mash("version").stdout.split()[0] == "0.1.3" and farm.alive("0.1.3")
        assert_each_reading_once(farm, before)
    finally:
        farm.stop()


@pytest.fixture
def wheel_server(wheels):
    """The wheels over plain http on loopback (what an https URL would serve)."""
    directory = wheels["good"].parent
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(directory), **k)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.RequestHandlerClass.log_message = lambda *a: None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_update_remote_bad_release_rolls_back_and_restart_is_acked_once(tmp_path, wheels, broker,
                                                                         wheel_server):
    farm = Farm(tmp_path, **broker.env()).start()
    observer = broker.observer()
    try:
        before = farm.readings()
        bad = wheels["bad"]
        t0 = time.monotonic()
        observer.publish("devices/rpi_gateway_001/commands", {
            "id": "upd-1", "command": "update",
            "parameters": {"version": "0.1.2", "url": f"{wheel_server}/{bad.name}",
                           "sha256": sha(bad)}})
        acks = lambda cid: [m for m in observer.on("/command_ack") if m["id"] == cid]
        ack = wait_for(lambda: acks("upd-1"), timeout=120, interval=0.3, what="update ack")[0]
        assert ack["status"] == "failed", ack
        assert "rolled back to 0.1.0" in ack["response"]["reason"]
        assert "reader did not come back" in ack["response"]["reason"]
        assert time.monotonic() - t0 < 90
        assert releases.current_version(farm.home) == "0.1.0"
        assert "0.1.2" in releases.State(farm.home).bad
        assert not (farm.home / "releases" / "0.1.2").exists()
        wait_for(lambda: farm.alive("0.1.0"), timeout=30, what="0.1.0 back")
        n = len(farm.readings())
        wait_for(lambda: len(farm.readings()) > n + 3, timeout=30, what="readings on 0.1.0")
        assert_each_reading_once(farm, before)

        pids = {n: b["pid"] for n, b in farm.beats().items() if n in ("reader", "worker")}
        observer.publish("devices/rpi_gateway_001/commands", {"id": "rst-1", "command": "RESTART"})
        ack = wait_for(lambda: acks("rst-1"), timeout=60, interval=0.3, what="restart ack")[0]
        assert ack["status"] == "completed" and ack["response"]["version"] == "0.1.0", ack
        assert all(farm.beats()[n]["pid"] != pid for n, pid in pids.items())
        # the status carries the health figures (mash.health), from the release that runs
        status = wait_for(lambda: [m for m in observer.on("/status")
                                   if (m.get("health") or {}).get("version") == "0.1.0"],
                          timeout=30, what="status with health")[-1]
        assert {"uptime_s", "cpu_temp_c", "disk_used_pct", "memory_used_pct",
                "under_voltage"} <= set(status["health"])
        # the same ids again: the ledger runs each once, and each is acked once
        observer.publish("devices/rpi_gateway_001/commands", {"id": "rst-1", "command": "RESTART"})
        time.sleep(3)
        assert len(acks("upd-1")) == 1 and len(acks("rst-1")) == 1
    finally:
        observer.close()
        farm.stop()
