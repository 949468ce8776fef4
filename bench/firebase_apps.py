"""The MASH apps' Firebase layout, measured: ``python bench/firebase_apps.py [writes|backfill]``.

- ``writes``: the default layout (``both``) with the real reader, worker and simulated board,
  time scaled 10x (a line per 0.5 s, SYNC_INTERVAL and HEARTBEAT_INTERVAL 6 s) for 360 s of
  wall time = one farm hour; counts the write requests the RTDB stand-in received, by kind.
- ``backfill``: a store holding 30 days (1,036,800 readings: two rooms, a line per 5 s) and a
  worker meeting Firebase (layout ``apps``) for the first time; time until every hour is
  written, and the worker's peak RSS (VmHWM).

Every server listens on 127.0.0.1 on a free port and is stopped here. Prints figures only.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MASH_ENV_FILE", os.devnull)
os.environ.setdefault("MASH_DATA_DIR", tempfile.mkdtemp(prefix="mash-bench-"))

from mash import ids  # noqa: E402
from mash.clock import utcnow  # noqa: E402
from mash.models import Store  # noqa: E402
from tests.services import RTDBStandIn, make_service_account, stop_process, wait_for  # noqa: E402

SERIAL = "MASH-B2-CAL26-CE637C"


def env_for(rtdb, data: Path, **extra) -> dict:
    return {**os.environ, "MASH_DATA_DIR": str(data), "DEVICE_ID": SERIAL, "CLOCK_SYNC": "trust",
            "FIREBASE_DATABASE_URL": "https://mash-bench.firebaseio.com",
            "FIREBASE_CREDENTIALS": str(rtdb.credentials),
            "FIREBASE_DATABASE_EMULATOR_HOST": rtdb.host, "PYTHONPATH": str(ROOT),
            "CONTROL_MODE": "off", **extra}


def kind(body: dict) -> str:
    paths = list(body)
    first = paths[0]
    if first.startswith("devices/") and first.endswith("/status"):
        return "status"
    for prefix, name in (("sensor_data/", "guide sensor_data"), ("historical_aggregates/", "aggregates"),
                         ("actuator_logs/", "relays"), ("alerts/", "alerts"),
                         ("notifications/", "alerts")):
        if first.startswith(prefix):
            return name
    if any("/latest_reading/" in p for p in paths):
        return "live (latest_reading + live_readings)"
    return "other"


def writes(seconds: float = 360.0) -> None:
    from mash.simulator import SimulatedBoard
    base = Path(tempfile.mkdtemp(prefix="mash-bench-fb-"))
    rtdb = RTDBStandIn().start()
    rtdb.credentials = make_service_account(base / "firebase_config.json")
    board = SimulatedBoard(interval=0.5, link=base / "ttyMASH", seed=3).start(banner=False)
    env = env_for(rtdb, base / "data", SERIAL_PORT=board.port, SYNC_INTERVAL="6",
                  HEARTBEAT_INTERVAL="6")
    log = open(base / "gateway.log", "ab")
    procs = [subprocess.Popen([sys.executable, str(ROOT / name)], env=env, cwd=str(base),
                              stdout=log, stderr=log) for name in ("reader.py", "worker.py")]
    try:
        wait_for(lambda: rtdb._get(["devices", SERIAL, "latest_reading"]), timeout=60, what="live")
        with rtdb.lock:
            rtdb.requests.clear()
        lines0 = board.sent_readings
        time.sleep(seconds)
        lines = board.sent_readings - lines0
        ws = rtdb.writes()
    finally:
        for p in procs:
            stop_process(p, timeout=20)
        board.stop()
        rtdb.stop()
    by = Counter(kind(body) for method, _, body in ws if method == "PATCH" and body)
    by.update(f"{method} (other)" for method, _, _ in ws if method != "PATCH")
    per_hour = 3600 / (seconds * 10)          # time is scaled 10x
    print(f"one farm hour = {seconds:.0f} s at 10x: {lines} reading lines "
          f"({lines * per_hour:.0f} per farm hour)")
    for name, n in sorted(by.items()):
        print(f"  {name}: {n * per_hour:.0f} writes per hour")
    total = sum(by.values()) * per_hour
    limit = 2 * lines * per_hour + 2 * 2
    print(f"  total: {total:.0f} writes per hour; the issue's bound (2 per reading + 2 per hour "
          f"per room): {limit:.0f}")


def backfill(days: int = 30) -> None:
    base = Path(tempfile.mkdtemp(prefix="mash-bench-fb-"))
    data = base / "data"
    store = Store(data / "mash.db")
    start = utcnow().replace(minute=0, second=0, microsecond=0) - dt.timedelta(days=days)
    t = time.monotonic()
    lines = days * 24 * 720
    sql = ("INSERT INTO sensor_data (room, temperature, humidity, co2, timestamp, synced, fb_key,"
           " simulated) VALUES (?, ?, ?, ?, ?, 1, ?, 0)")

    def rows():
        for i in range(lines):
            ts = start + dt.timedelta(seconds=5 * i)
            key, stamp = ids.firebase_key(ts), str(ts)
            yield ("fruiting", 22 + i % 30 / 10, 85 + i % 9 / 10, 700 + i % 97, stamp, key)
            yield ("spawning", 27 + i % 20 / 10, 72 + i % 5 / 10, 3000 + i % 89, stamp, key)
    with store.transaction():
        store.db.connection().executemany(sql, rows())
    readings = store.m.SensorData.select().count()
    store.close()
    print(f"seeded {readings:,} readings ({days} days) in {time.monotonic() - t:.0f} s")
    rtdb = RTDBStandIn().start()
    rtdb.credentials = make_service_account(base / "firebase_config.json")
    env = env_for(rtdb, data, FIREBASE_LAYOUT="apps", SYNC_INTERVAL="60")
    log = open(base / "worker.log", "ab")
    hours = 2 * days * 24
    t = time.monotonic()
    worker = subprocess.Popen([sys.executable, str(ROOT / "worker.py")], env=env, cwd=str(base),
                              stdout=log, stderr=log)

    def written():
        agg = rtdb._get(["historical_aggregates", SERIAL]) or {}
        return sum(len(h) for months in agg.values() for days_ in months.values()
                   for h in days_.values())
    try:
        wait_for(lambda: written() >= hours, timeout=1200, interval=0.5, what="backfill")
        took = time.monotonic() - t
        status = Path(f"/proc/{worker.pid}/status").read_text()
        hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    finally:
        stop_process(worker, timeout=20)
        rtdb.stop()
    updates = len([w for w in rtdb.writes() if w[0] == "PATCH"])
    print(f"backfill of {hours} hours ({readings:,} readings): {took:.1f} s from the worker's start, "
          f"{updates} update requests; worker peak RSS {hwm / 1024:.1f} MB")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["writes", "backfill"])
    ap.add_argument("--seconds", type=float, default=360.0)
    ap.add_argument("--days", type=int, default=30)
    a = ap.parse_args()
    writes(a.seconds) if a.what == "writes" else backfill(a.days)
