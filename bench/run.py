"""Benchmarks: print figures, assert nothing. ``python bench/run.py [--quick] [names...]``

Every server runs on 127.0.0.1 on a free port and is stopped here. Figures are medians or
percentiles over repeated samples; this machine is shared and noisy, so compare ratios.
Results and the command that produced them go in docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MASH_ENV_FILE", os.devnull)
os.environ.setdefault("MASH_DATA_DIR", tempfile.mkdtemp(prefix="mash-bench-"))

from tests.services import Broker, DevServer, RTDBStandIn, make_service_account, wait_for  # noqa: E402

RESULTS: list[tuple[str, str, str, str]] = []   # (figure, measured, target, verdict)


def record(name: str, value: float, unit: str, target: str | None = None, ok: bool | None = None):
    shown = (f"{value:,.2f} {unit}" if abs(value) < 1 else f"{value:,.1f} {unit}") \
        if isinstance(value, float) else f"{value:,} {unit}"
    verdict = "" if ok is None else ("met" if ok else "MISSED")
    RESULTS.append((name, shown, target or "", verdict))
    print(f"  {name}: {shown}" + (f"  (target {target}: {verdict})" if target else ""), flush=True)


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def write_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def add_backlog(store, lines: int) -> None:
    S = store.m.SensorData
    start = dt.datetime.utcnow() - dt.timedelta(days=30)
    rows = []
    for i in range(lines):
        ts = start + dt.timedelta(seconds=5 * i)
        key = ts.strftime("%Y-%m-%dT%H-%M-%S")
        rows.append(dict(room="fruiting", temperature=24.0, humidity=85.0, co2=800, timestamp=ts, fb_key=key))
        rows.append(dict(room="spawning", temperature=28.0, humidity=70.0, co2=900, timestamp=ts, fb_key=key))
        if len(rows) >= 20000:
            with store.transaction():
                for k in range(0, len(rows), 400):
                    S.insert_many(rows[k:k + 400]).execute()
            rows = []
    with store.transaction():
        for k in range(0, len(rows), 400):
            S.insert_many(rows[k:k + 400]).execute()


class Scratch:
    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="mash-bench-"))
        self.stoppers = []

    def devserver(self, **kw) -> DevServer:
        s = DevServer(self.dir / f"dev{len(self.stoppers)}", **kw).start()
        self.stoppers.append(s.stop)
        return s

    def broker(self) -> Broker:
        b = Broker(self.dir / f"broker{len(self.stoppers)}").start()
        self.stoppers.append(b.stop)
        return b

    def close(self):
        for stop in reversed(self.stoppers):
            try:
                stop()
            except Exception:
                pass


def spawn(script: str, env: dict, log: Path, scratch: "Scratch") -> subprocess.Popen:
    out = open(log, "ab")
    args = [sys.executable, str(ROOT / script)] if script.endswith(".py") else \
        [sys.executable, "-m", script]
    proc = subprocess.Popen(args, env=env, cwd=str(log.parent), stdout=out, stderr=out)
    scratch.stoppers.append(lambda: stop(proc))     # never leave a process behind
    return proc


def stop(*procs):
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()


# -- benchmarks ---------------------------------------------------------------------------------
def bench_reader_flood(quick: bool):
    """Readings stored per second from a flooding pty; reader RSS after."""
    from mash.models import Store
    from mash.simulator import SimulatedBoard
    s = Scratch()
    n = 2000 if quick else 10000
    try:
        board = SimulatedBoard(interval=0, link=s.dir / "tty").start(banner=False)
        env = dict(os.environ, SERIAL_PORT=board.port, MASH_DATA_DIR=str(s.dir / "data"))
        reader = spawn("reader.py", env, s.dir / "reader.log", s)
        SensorData = Store(s.dir / "data" / "mash.db").m.SensorData
        wait_for(lambda: board.boots >= 1, timeout=20)          # the reader opened the port
        board.emit_reading()
        wait_for(lambda: SensorData.select().count() >= 2, timeout=20)
        time.sleep(0.5)
        base = SensorData.select().count()
        t0 = time.monotonic()
        for _ in range(n):
            board.emit_reading()
        wait_for(lambda: SensorData.select().count() >= base + 2 * n, timeout=600, interval=0.02)
        took = time.monotonic() - t0
        record("reader: lines stored/s from a flooding pty", n / took, "lines/s")
        record("reader: readings (rows) stored/s", 2 * n / took, "rows/s")
        record("reader RSS after the flood", rss_mb(reader.pid), "MB", "<= 30 MB", rss_mb(reader.pid) <= 30)
        stop(reader)
        board.stop()
    finally:
        s.close()


def _runtime(store_path, server, batch_size=50):
    from mash.config import Settings
    from mash.models import Store
    from mash.tasks.context import WorkerContext
    settings = Settings.from_mapping({**server.env(), "MASH_DATA_DIR": str(store_path.parent),
                                      "BATCH_SIZE": str(batch_size)})
    return WorkerContext(settings, store=Store(store_path), mqtt=None, firebase=None)


def bench_upload(quick: bool):
    """Upload throughput to the reference backend: batches of 500 on loopback."""
    from mash.sinks.backend_api import BackendAPIClient
    from mash.config import Settings
    s = Scratch()
    try:
        server = s.devserver()
        client = BackendAPIClient(Settings.from_mapping({**server.env(), "MASH_DATA_DIR": str(s.dir)}))
        client.register_device()
        rates = []
        for b in range(10 if quick else 40):
            batch = [{"id": f"u{b}-{i}", "room": "fruiting", "temperature": 24.0, "humidity": 85.0,
                      "co2": 800, "timestamp": "2026-01-28T10:00:00.000Z"} for i in range(500)]
            t0 = time.perf_counter()
            client.upload_readings(batch, f"k{b}")
            rates.append(500 / (time.perf_counter() - t0))
        record("backend upload, batch of 500 (median)", statistics.median(rates), "readings/s")
    finally:
        s.close()


def bench_drain(quick: bool, lines: int, latency: float = 0.0, label: str = "", target=None):
    from mash.tasks import sync
    s = Scratch()
    try:
        server = s.devserver(rate_limit=600, rate_window=60)   # a per-client limit, as in production
        rt = _runtime(s.dir / "data" / "mash.db", server, batch_size=50)
        add_backlog(rt.store, lines // 2)
        sync.ensure_registered(rt)
        if latency:
            server.faults(latency=latency)
        t0 = time.monotonic()
        sent = 0
        while rt.store.pending_count():
            try:
                sent += sync.sync_readings(rt)
            except Exception as exc:          # a 429: wait as asked, as Huey's RetryTask would
                wait = getattr(exc, "retry_after", None) or 1.0
                time.sleep(wait)
        took = time.monotonic() - t0
        rate = lines / took
        record(f"backlog drain, {lines:,} readings{label}", rate, "readings/s",
               target and f">= {target:,} readings/s", target and rate >= target)
        S = rt.store.m.SensorData
        assert S.select().where(S.synced == 1).count() == lines
    finally:
        s.close()


def bench_mqtt_roundtrip(quick: bool):
    """QoS 1 publish -> PUBACK, and publish -> a subscriber, on loopback with TLS."""
    from mash.sinks.mqtt_client import MQTTClient
    from mash.config import Settings
    s = Scratch()
    try:
        broker = s.broker()
        obs = broker.observer()
        client = MQTTClient(Settings.from_mapping({**broker.env(), "MASH_DATA_DIR": str(s.dir)}))
        assert client.connect()
        acks, seen = [], []
        n = 100 if quick else 500
        for i in range(n):
            done = threading.Event()
            t0 = time.perf_counter()
            client.publish("bench", {"i": i}, on_confirm=done.set)
            done.wait(5)
            acks.append(time.perf_counter() - t0)
            wait_for(lambda: len(obs.on("/bench")) > i, timeout=5, interval=0.0005)
            seen.append(time.perf_counter() - t0)
        record("MQTT QoS 1 publish -> PUBACK, p50", pct(acks, 50) * 1000, "ms")
        record("MQTT QoS 1 publish -> PUBACK, p95", pct(acks, 95) * 1000, "ms")
        record("MQTT publish -> subscriber, p50", pct(seen, 50) * 1000, "ms")
        client.disconnect()
        obs.close()
    finally:
        s.close()


def _gateway(s: Scratch, interval: float, extra_env=None, chamber=False):
    """Board + reader.py + worker.py + devserver + broker + RTDB stand-in, all real."""
    from mash.chamber import Chamber
    from mash.simulator import SimulatedBoard
    server, broker = s.devserver(), s.broker()
    rtdb = RTDBStandIn().start()
    s.stoppers.append(rtdb.stop)
    cred = make_service_account(s.dir / "fb.json")
    board = SimulatedBoard(interval=interval, link=s.dir / "tty",
                           chamber=Chamber() if chamber else None).start(banner=False)
    s.stoppers.append(board.stop)
    env = dict(os.environ, **server.env(), **broker.env(), SERIAL_PORT=board.port,
               MASH_DATA_DIR=str(s.dir / "data"), FIREBASE_DATABASE_URL="https://mash-bench.firebaseio.com",
               FIREBASE_CREDENTIALS=str(cred), FIREBASE_DATABASE_EMULATOR_HOST=rtdb.host,
               PYTHONPATH=str(ROOT), **(extra_env or {}))
    reader = spawn("reader.py", env, s.dir / "reader.log", s)
    worker = spawn("worker.py", env, s.dir / "worker.log", s)
    return board, server, broker, rtdb, reader, worker, env


def bench_live_latency(quick: bool):
    """Serial line -> MQTT subscriber, idle and while a backlog drains."""
    from mash.models import Store
    s = Scratch()
    try:
        board, server, broker, rtdb, reader, worker, env = _gateway(s, interval=0)
        obs = broker.observer()
        store = Store(s.dir / "data" / "mash.db")
        wait_for(lambda: board.boots >= 1, timeout=20)
        time.sleep(3)

        def sample(n, gap):
            lat = []
            for i in range(n):
                co2 = 400 + (int(time.time() * 1000) + i) % 4500
                mark = len(obs.on("/sensor_data"))
                t0 = time.monotonic()
                board.emit_reading({"fruiting": {"temp": 24.0, "humidity": 85.0, "co2": co2},
                                    "spawning": {"temp": 28.0, "humidity": 70.0, "co2": 900}})
                try:
                    wait_for(lambda: any(m["fruiting"]["co2"] == co2 for m in obs.on("/sensor_data")[mark:]),
                             timeout=5, interval=0.002)
                    lat.append(time.monotonic() - t0)
                except AssertionError:
                    lat.append(5.0)
                time.sleep(gap)
            return lat

        n = 40 if quick else 200
        idle = sample(n, 0.2)
        record("serial line -> MQTT subscriber, idle, p50", pct(idle, 50) * 1000, "ms")
        record("serial line -> MQTT subscriber, idle, p95", pct(idle, 95) * 1000, "ms", "<= 250 ms",
               pct(idle, 95) <= 0.25)
        add_backlog(store, 50000 if not quick else 10000)
        server.faults(latency=0.2)
        subprocess.run([sys.executable, "-m", "mash", "sync"], env=env, capture_output=True, timeout=60)
        time.sleep(1)
        busy = sample(n, 0.2)
        record("serial line -> MQTT subscriber, during a drain, p50", pct(busy, 50) * 1000, "ms")
        record("serial line -> MQTT subscriber, during a drain, p95", pct(busy, 95) * 1000, "ms",
               "<= 250 ms", pct(busy, 95) <= 0.25)
        obs.close()
        stop(reader, worker)
    finally:
        s.close()


def bench_resources(quick: bool, control: bool = False):
    """At the real board's rate (a line per 5 s): CPU, bytes written per line, RSS after an
    hour-equivalent of lines. Climate control off (the first release's figures), or on
    against the simulated chamber (``resources_control``: the relays switch as on a farm)."""
    from mash.models import Store
    s = Scratch()
    window = 60 if quick else 300
    label = ", climate control on (chamber)" if control else ""
    try:
        board, server, broker, rtdb, reader, worker, env = _gateway(
            s, interval=5.0, extra_env={"CONTROL_MODE": "auto" if control else "off"},
            chamber=control)
        SensorData = Store(s.dir / "data" / "mash.db").m.SensorData
        # the third process of a farm's Pi, with no page open (mDNS off: nothing multicasts
        # on this machine's network; the phone API at its shipped default)
        from tests.services import Dashboard
        dash = Dashboard(s.dir / "dash", dict(env, MDNS="0")).start()
        s.stoppers.append(dash.stop)
        wait_for(lambda: SensorData.select().count() >= 2, timeout=30)
        time.sleep(10)                                  # let start-up work settle
        procs = {"reader": reader.pid, "worker": worker.pid, "dashboard": dash.proc.pid}
        cpu0 = {k: cpu_seconds(p) for k, p in procs.items()}
        io0 = {k: write_bytes(p) for k, p in procs.items()}
        rows0, t0, switches0 = SensorData.select().count(), time.monotonic(), len(board.switches)
        time.sleep(window)
        took = time.monotonic() - t0
        lines = (SensorData.select().count() - rows0) / 2
        cpu = {k: (cpu_seconds(p) - cpu0[k]) / took * 100 for k, p in procs.items()}
        io = {k: write_bytes(p) - io0[k] for k, p in procs.items()}
        record(f"CPU at a line per 5 s, reader ({window} s){label}", cpu["reader"], "% of a core")
        record(f"CPU at a line per 5 s, worker ({window} s){label}", cpu["worker"], "% of a core")
        total = cpu["reader"] + cpu["worker"]
        record(f"CPU at a line per 5 s, reader + worker{label}", total, "% of a core", "<= 0.5 %",
               total <= 0.5)
        record(f"CPU at a line per 5 s, dashboard with no page open{label}", cpu["dashboard"],
               "% of a core", "<= 0.1 %", cpu["dashboard"] <= 0.1)
        per_line = sum(io.values()) / max(lines, 1)
        record(f"disk bytes written per line{label} (reader {io['reader'] / max(lines, 1) / 1024:.1f} KB, "
               f"worker {io['worker'] / max(lines, 1) / 1024:.1f} KB, dashboard "
               f"{io['dashboard'] / max(lines, 1) / 1024:.1f} KB)", per_line / 1024, "KB/line",
               "<= 12 KB", per_line <= 12 * 1024)
        if control:
            record("relay switches per line in that window (climate control)",
                   (len(board.switches) - switches0) / max(lines, 1), "switches")
            stop(reader, worker)
            return
        # an hour-equivalent: 720 lines, as fast as the pipeline takes them
        board.interval = 0
        base = SensorData.select().count()
        for _ in range(720):
            board.emit_reading()
            time.sleep(0.005)
        wait_for(lambda: SensorData.select().count() >= base + 1440, timeout=120)
        subprocess.run([sys.executable, "-m", "mash", "sync", "--wait", "--timeout", "120"], env=env,
                       capture_output=True, timeout=180)
        time.sleep(3)
        record("reader RSS after an hour-equivalent", rss_mb(reader.pid), "MB", "<= 30 MB",
               rss_mb(reader.pid) <= 30)
        record("worker RSS after an hour-equivalent", rss_mb(worker.pid), "MB", "<= 60 MB",
               rss_mb(worker.pid) <= 60)
        record("dashboard RSS after it (no page open)", rss_mb(dash.proc.pid), "MB")
        three = rss_mb(reader.pid) + rss_mb(worker.pid) + rss_mb(dash.proc.pid)
        record("reader + worker + dashboard RSS (the Pi Zero 2 W budget)", three, "MB",
               "<= 160 MB", three <= 160)
        stop(reader, worker)
    finally:
        s.close()


def _reader_bytes_per_line(s: Scratch, name: str, page_size: int, pending_index: bool,
                           interval: float, window: float) -> float:
    """The reader alone at ``interval`` s a line: bytes it writes per line, on a store laid
    out as a step of the SD-card work left it (page size, the old partial index)."""
    import sqlite3
    from mash.models import Store
    from mash.simulator import SimulatedBoard
    data = s.dir / name / "data"
    data.mkdir(parents=True)
    with sqlite3.connect(data / "mash.db") as conn:       # the page size is fixed by the first table
        conn.execute(f"PRAGMA page_size = {page_size}")
        conn.execute("CREATE TABLE layout (x)")
    store = Store(data / "mash.db")
    if pending_index:
        store.db.execute_sql("CREATE INDEX sensor_data_pending ON sensor_data (id) WHERE synced = 0")
    board = SimulatedBoard(interval=interval, link=s.dir / name / "tty", seed=5).start(banner=False)
    s.stoppers.append(board.stop)
    env = dict(os.environ, SERIAL_PORT=board.port, MASH_DATA_DIR=str(data), PYTHONPATH=str(ROOT))
    reader = spawn("reader.py", env, s.dir / name / "reader.log", s)
    wait_for(lambda: store.pending_count() >= 4, timeout=60)
    rows0, io0 = store.pending_count(), write_bytes(reader.pid)
    time.sleep(window)
    lines = (store.pending_count() - rows0) / 2
    per_line = (write_bytes(reader.pid) - io0) / max(lines, 1)
    stop(reader)
    return per_line


def bench_sd_steps(quick: bool):
    """Each SD-card step's saving on the reader's side, the three layouts side by side at
    the board's rate (the worker's side is in ``resources``)."""
    s = Scratch()
    window = 60 if quick else 300
    steps = [("4 KiB pages, partial index on pending readings (schema v1)", 4096, True),
             ("4 KiB pages, progress marker instead of the index", 4096, False),
             ("1 KiB pages, progress marker (schema v2, a new store)", 1024, False)]
    try:
        results = {}
        threads = [threading.Thread(target=lambda i=i, st=st: results.__setitem__(
            i, _reader_bytes_per_line(s, f"step{i}", st[1], st[2], 5.0, window)))
            for i, st in enumerate(steps)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, (label, _, _) in enumerate(steps):
            record(f"reader bytes written per line at a line per 5 s: {label}",
                   results[i] / 1024, "KB/line")
    finally:
        s.close()


def bench_control(quick: bool):
    """The climate controller: its cost per reading, and six simulated hours against the
    simulated chamber in lockstep (time to the band, time in it, switches an hour)."""
    from mash.chamber import Chamber
    from mash.control import ClimateController
    t = [0.0]
    ctl = ClimateController(clock=lambda: t[0],
                            wallclock=lambda: dt.datetime(2026, 1, 28, 10, 0).astimezone()
                            + dt.timedelta(seconds=t[0]))
    chamber = Chamber(fruiting=(24.0, 70.0, 800.0))
    relays = {a: "OFF" for a in ctl.relays}
    costs, humidity, switches = [], [], 0
    hours = 1 if quick else 6
    for second in range(1, hours * 3600 + 1):
        t[0] = float(second)
        chamber.step(1.0, relays)
        reading = second % 5 == 0
        t0 = time.perf_counter()
        if reading:
            r = chamber.reading()
            for room, v in r.items():
                ctl.observe(room, v["temp"], v["humidity"], v["co2"])
        changes = ctl.decide()
        if reading:
            costs.append(time.perf_counter() - t0)
            humidity.append((t[0], r["fruiting"]["humidity"]))
        for actuator, state in changes.items():
            relays[actuator] = state
            ctl.switched(actuator, state)
            ctl.known_state(actuator, state, "auto")
            switches += 1
    reached = next(s for s, h in humidity if h >= 85)
    after = [h for s, h in humidity if s > reached]
    record("controller: cost per reading (observe both rooms + decide), median",
           statistics.median(costs) * 1e6, "us", "<= 1 ms", statistics.median(costs) <= 1e-3)
    record("controller: cost per reading, p99", pct(costs, 99) * 1e6, "us")
    record("control: fruiting 70 % -> 85 %, simulated", reached, "s")
    record(f"control: time within 85-95 % after that ({hours} simulated h)",
           100.0 * sum(85 <= h <= 95 for h in after) / len(after), "%")
    record("control: relay switches per simulated hour", switches / hours, "switches")


def _peak_rss_run(args, env, cwd) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one command run as its own process."""
    probe = ("import resource, subprocess, sys, time; t = time.monotonic(); "
             "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
             "print(time.monotonic() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", probe, *args], env=env, cwd=cwd,
                         capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), int(out[1]) / 1024


def bench_export(quick: bool):
    """``mash export`` of a million rows (30 days of two rooms at 5 s): rows/s and peak RSS,
    against an export of a tenth of them."""
    from mash.models import Store
    s = Scratch()
    try:
        data = s.dir / "data"
        store = Store(data / "mash.db")
        lines = 50_000 if quick else 500_000
        add_backlog(store, lines)
        env = dict(os.environ, MASH_DATA_DIR=str(data))
        cmd = [sys.executable, "-m", "mash", "export", "-o", str(s.dir / "out.csv")]
        small_to = (dt.datetime.utcnow() - dt.timedelta(days=30) +
                    dt.timedelta(seconds=5 * lines // 10)).isoformat()
        t_small, rss_small = _peak_rss_run(cmd + ["--to", small_to], env, s.dir)
        runs = [_peak_rss_run(cmd, env, s.dir) for _ in range(3)]
        t_all = statistics.median(r[0] for r in runs)
        rss_all = max(r[1] for r in runs)
        rows = 2 * lines
        record(f"export {rows:,} rows, CSV to a file", rows / t_all, "rows/s")
        record(f"export peak RSS, {rows:,} rows", rss_all, "MB")
        record(f"export peak RSS, {rows // 10:,} rows", rss_small, "MB")
        jl = [_peak_rss_run(cmd + ["--format", "jsonl"], env, s.dir)[0] for _ in range(3)]
        record(f"export {rows:,} rows, JSON lines", rows / statistics.median(jl), "rows/s")
    finally:
        s.close()


def bench_doctor(quick: bool):
    """``mash doctor`` on a healthy stack (every part configured and up): its run time."""
    s = Scratch()
    try:
        board, server, broker, rtdb, reader, worker, env = _gateway(s, interval=5.0)
        env = dict(env, HEARTBEAT_INTERVAL="5", SYNC_INTERVAL="5")
        stop(worker)
        worker = spawn("worker.py", env, s.dir / "worker2.log", s)
        from mash.models import Store
        wait_for(lambda: (s.dir / "data" / "mash.db").exists(), timeout=30)
        store = Store(s.dir / "data" / "mash.db")
        wait_for(lambda: store.get_stats()["total_synced"] > 0, timeout=60, interval=0.5)
        times, oks = [], []
        for _ in range(3 if quick else 7):
            out = subprocess.run([sys.executable, "-m", "mash", "doctor", "--json"], env=env,
                                 cwd=str(s.dir), capture_output=True, text=True, timeout=120)
            report = json.loads(out.stdout)
            times.append(report["seconds"])
            oks.append(report["ok"])
        record("mash doctor, healthy stack (median)", statistics.median(times), "s")
        record("mash doctor runs with every check passed", sum(oks), f"of {len(oks)}")
    finally:
        s.close()


def bench_dashboard(quick: bool):
    """The dashboard over 30 days of readings (~1 million rows): the page and its data in
    Chromium (p95 of 20 loads), the chart endpoint, RSS, idle CPU with a page open, and how
    soon a stored reading shows on the open page."""
    from mash.alerts import AlertEvent
    from mash.models import Store
    from tests.services import Dashboard, browser, free_port
    s = Scratch()
    driver = None
    stop_writer, quiet = threading.Event(), threading.Event()
    try:
        data = s.dir / "data"
        store = Store(data / "mash.db")
        lines = 50_000 if quick else 518_400               # 30 days at a line per 5 s
        add_backlog(store, lines)
        S = store.m.SensorData
        with store.transaction():                           # all but the last 200 synced
            S.update(synced=1, synced_at=dt.datetime.utcnow()).where(S.id < 2 * lines - 200).execute()
            store._upsert_sink("backend", progress=2 * lines - 201)
        store.add_alerts([AlertEvent("high_co2", "CRITICAL", "fruiting", 1600.0, 1500.0,
                                     "raised" if i % 2 == 0 else "cleared", f"co2 event {i}")
                          for i in range(200)])
        rows = store.m.SensorData.select().count()
        record("dashboard bench store", rows, "readings")
        # the phone API as by default (read), but on loopback; no multicast from a benchmark
        dash = Dashboard(s.dir / "dash", dict(os.environ, MASH_DATA_DIR=str(data), MDNS="0",
                                              PHONE_API="read", PHONE_API_HOST="127.0.0.1",
                                              PHONE_API_PORT=str(free_port())))
        dash.start()
        s.stoppers.append(dash.stop)
        def writer():                                       # the reader's pace, a line per 5 s
            w = Store(data / "mash.db")
            while not stop_writer.wait(5.0):
                if quiet.is_set():
                    continue
                with w.transaction():
                    w.save_sensor_data({"fruiting": {"temp": 24.0, "humidity": 88.0, "co2": 700},
                                        "spawning": {"temp": 27.0, "humidity": 70.0, "co2": 3000}})
        threading.Thread(target=writer, daemon=True).start()
        import requests
        from mash.dashboard import data as dash_data
        for days in (1, 7):                                 # the aggregate a chart miss costs
            times = []
            for _ in range(20):
                t = time.perf_counter()
                dash_data.series(store, "fruiting", days * 24.0)
                times.append(time.perf_counter() - t)
            record(f"chart series, {days * 24} h, computed (cache miss), p95 of 20",
                   pct(times, 95) * 1000, "ms", "<= 200 ms", pct(times, 95) <= 0.2)
        for days in (1, 7):
            times = []
            for _ in range(20):
                t = time.perf_counter()
                r = requests.get(f"{dash.url}/chart/fruiting/humidity.svg?days={days}", timeout=30)
                times.append(time.perf_counter() - t)
                assert r.status_code == 200
            record(f"chart endpoint, {days * 24} h, p95 of 20 (the series cached after the first)",
                   pct(times, 95) * 1000, "ms", "<= 200 ms", pct(times, 95) <= 0.2)
        times = []
        for _ in range(20):
            t = time.perf_counter()
            requests.get(dash.url + "/api/state", timeout=30)
            times.append(time.perf_counter() - t)
        record("/api/state, p95 of 20", pct(times, 95) * 1000, "ms")
        driver = browser(s.dir / "profile")
        loads = []
        for i in range(20):
            driver.get("about:blank")
            t = time.perf_counter()
            driver.get(dash.url + "/")
            wait_for(lambda: driver.execute_script(
                "return document.getElementById('pending').textContent !== '–' && "
                "Array.from(document.querySelectorAll('img[data-chart]'))"
                ".every(i => i.complete && i.naturalWidth > 0)"), timeout=30, interval=0.01)
            loads.append(time.perf_counter() - t)
        record("page and its data in Chromium (6 charts, state), p95 of 20", pct(loads, 95) * 1000,
               "ms", "<= 1000 ms", pct(loads, 95) <= 1.0)
        record("page and its data in Chromium, median", statistics.median(loads) * 1000, "ms")
        # a reading stored -> shown on the open page (the background writer paused, so the
        # measured reading stays the newest until it shows)
        quiet.set()
        time.sleep(1.0)
        lat = []
        for i in range(10):
            with store.transaction():
                store.save_sensor_data({"fruiting": {"temp": 24.0, "humidity": 88.0, "co2": 2000 + i},
                                        "spawning": {"temp": 27.0, "humidity": 70.0, "co2": 3000}})
            t = time.perf_counter()
            shown = lambda: driver.execute_script(                                  # noqa: E731
                "return document.querySelector('[data-room=fruiting] [data-field=co2]').textContent")
            wait_for(lambda: shown() == str(2000 + i), timeout=10, interval=0.01)
            lat.append(time.perf_counter() - t)
            time.sleep(1.3)
        record("reading stored -> shown on the open page, median", statistics.median(lat) * 1000, "ms",
               "<= 2000 ms", max(lat) <= 2.0)
        record("reading stored -> shown on the open page, max of 10", max(lat) * 1000, "ms")
        quiet.clear()
        cpu0, t0 = cpu_seconds(dash.proc.pid), time.monotonic()
        time.sleep(30 if quick else 60)
        cpu = (cpu_seconds(dash.proc.pid) - cpu0) / (time.monotonic() - t0) * 100
        record("dashboard CPU, a page open, a line per 5 s", cpu, "% of a core", "<= 1 %", cpu <= 1.0)
        rss = rss_mb(dash.proc.pid)
        record("dashboard RSS after the runs above", rss, "MB", "<= 60 MB", rss <= 60)
    finally:
        stop_writer.set()
        if driver is not None:
            driver.quit()
        s.close()


def bench_backup(quick: bool):
    """``mash backup`` and ``mash restore`` of a 30-day store (two rooms at 5 s): time, the
    store's and the archive's size."""
    from mash.models import Store
    s = Scratch()
    try:
        data = s.dir / "data"
        store = Store(data / "mash.db")
        lines = 50_000 if quick else 518_400          # 30 days at a line per 5 s
        add_backlog(store, lines)
        store.close()
        env = dict(os.environ, MASH_DATA_DIR=str(data))
        db_mb = sum(p.stat().st_size for p in data.glob("mash.db*")) / 1e6
        times = []
        for i in range(3):
            t0 = time.monotonic()
            subprocess.run([sys.executable, "-m", "mash", "backup", "-o", str(s.dir / f"b{i}.tar.gz")],
                           env=env, check=True, capture_output=True)
            times.append(time.monotonic() - t0)
        archive = s.dir / "b0.tar.gz"
        record(f"backup of a {2 * lines:,}-reading store ({db_mb:.0f} MB)", statistics.median(times), "s")
        record("backup archive size", archive.stat().st_size / 1e6, "MB")
        fresh = dict(env, MASH_DATA_DIR=str(s.dir / "fresh"))
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-m", "mash", "restore", str(archive)], env=fresh,
                       check=True, capture_output=True)
        record("restore of that archive onto a fresh install (with mash doctor)",
               time.monotonic() - t0, "s")
    finally:
        s.close()


def bench_update(quick: bool):
    """``mash update`` to a healthy wheel and to one whose reader exits at start, on a real
    ``mash run`` laid out as releases (tests/test_update.py's farm), health window 10 s:
    time from the command to kept / rolled back."""
    from tests.test_update import Farm, build_wheel, sha
    s = Scratch()
    farm = None
    try:
        good = build_wheel(s.dir, "0.1.1")
        bad = build_wheel(s.dir, "0.1.2", reader_exits=True)
        farm = Farm(s.dir, UPDATE_HEALTH_WINDOW="10", CLOCK_SYNC="trust").start()
        for label, wheel in (("update to a healthy release", good),
                             ("update rolled back (reader exits at start)", bad)):
            t0 = time.monotonic()
            farm.mash("update", str(wheel), "--sha256", sha(wheel))
            record(f"{label}, health window 10 s", time.monotonic() - t0, "s")
    finally:
        if farm:
            farm.stop()
        s.close()


def bench_phone(quick: bool):
    """The grower app's local API (CONTRACT §10) over 30 days of readings (~1 million rows):
    p95 of 20 calls of the app's 5 s poll (/api/sensor/current), its statistics and sensor
    logs; the dashboard process's RSS with it; one read of the interface addresses (what the
    mDNS advertiser does every 2 s). mDNS itself stays off here: a benchmark does not
    multicast on this machine's network (its module is imported all the same)."""
    import requests
    from mash.dashboard import lan
    from mash.models import Store
    from tests.services import Dashboard, free_port, wait_port
    took = []
    for _ in range(1000):
        t0 = time.perf_counter()
        lan.lan_ipv4()
        took.append(time.perf_counter() - t0)
    record("interface addresses read (the mDNS poll), median of 1000",
           statistics.median(took) * 1e6, "µs")
    s = Scratch()
    try:
        data = s.dir / "data"
        store = Store(data / "mash.db")
        lines = 50_000 if quick else 518_400               # 30 days at a line per 5 s
        add_backlog(store, lines)
        record("phone bench store", store.m.SensorData.select().count(), "readings")
        port = free_port()
        dash = Dashboard(s.dir / "dash", dict(os.environ, MASH_DATA_DIR=str(data), MDNS="0",
                                              PHONE_API="read", PHONE_API_HOST="127.0.0.1",
                                              PHONE_API_PORT=str(port)))
        dash.start()
        s.stoppers.append(dash.stop)
        wait_port(port, timeout=20)
        base = f"http://127.0.0.1:{port}/api"
        for path, label in (("/sensor/current", "/api/sensor/current (the app's poll)"),
                            ("/logs/statistics?hours=24", "/api/logs/statistics, 24 h"),
                            ("/logs/statistics?hours=720", "/api/logs/statistics, 30 days"),
                            ("/logs/sensors?hours=24&limit=100", "/api/logs/sensors, 100 of 24 h")):
            samples = []
            for _ in range(20):
                t0 = time.perf_counter()
                r = requests.get(base + path, timeout=30)
                samples.append((time.perf_counter() - t0) * 1000)
                assert r.status_code in (200, 503), r.text
            record(f"{label}, p95 of 20", pct(samples, 95), "ms")
        requests.get(dash.url + "/", timeout=10)
        record("dashboard RSS with the phone API (after the calls above)", rss_mb(dash.proc.pid), "MB",
               "<= 60 MB", rss_mb(dash.proc.pid) <= 60)
    finally:
        s.close()


FLEET = {"gateways": 1000, "processes": 4, "outage": 60.0,
         # the backend half: a 10-minute backend outage, the fleet booted over one heartbeat
         # interval, the steady rate taken over this many s before it
         "backend_outage": 600.0, "boot_spread": 60.0, "steady": 180.0,
         # the backend half in this many slices, one after another (``--slices``)
         "slices": 1}


def bench_fleet(quick: bool):
    """A fleet behind one broker (``--gateways``, 1000): each gateway's own MQTT link
    (``bench/fleet.py``: our MQTTClient, TLS, password, reconnect jitter at the shipped
    MQTT_RECONNECT_MAX) in a few processes against one real mosquitto. The broker is killed
    for 60 s and started again; when each gateway is back says whether they stampede."""
    n = 200 if quick else FLEET["gateways"]
    outage = 20.0 if quick else FLEET["outage"]
    s = Scratch()
    try:
        broker = s.broker()
        env = dict(os.environ, **broker.env(), PYTHONPATH=str(ROOT))
        env.pop("MQTT_RECONNECT_MAX", None)             # the shipped default
        events: list[tuple[str, str, float]] = []
        procs = []
        per = -(-n // FLEET["processes"])
        for first in range(0, n, per):
            p = subprocess.Popen([sys.executable, str(ROOT / "bench" / "fleet.py"), str(first),
                                  str(min(per, n - first))], env=env, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            s.stoppers.append(lambda p=p: stop(p))
            procs.append(p)

            def read(p=p):
                for line in p.stdout:
                    word, device, at = line.split()
                    events.append((word, device, float(at)))
            threading.Thread(target=read, daemon=True).start()

        def back_after(t0):
            return {d: at for word, d, at in list(events) if word == "up" and at >= t0}
        t0 = time.time()
        wait_for(lambda: len(back_after(0)) >= n, timeout=300)
        record(f"fleet of {n}: every link up after a cold start", time.time() - t0, "s")
        time.sleep(5)
        broker.kill()
        time.sleep(outage)
        broker.start()
        restarted = time.time()
        wait_for(lambda: len(back_after(restarted)) >= n, timeout=outage + 300, interval=0.5)
        first_back: dict[str, float] = {}
        for word, d, at in sorted(events, key=lambda e: e[2]):
            if word == "up" and at >= restarted and d not in first_back:
                first_back[d] = at - restarted
        delays = sorted(first_back.values())
        busiest = max(collections.Counter(int(d) for d in delays).values()) / n * 100
        spread = pct(delays, 95) - pct(delays, 5)
        label = f"after a {outage:.0f} s broker outage, {n} gateways"
        record(f"{label}: reconnects, 5th to 95th percentile", spread, "s", ">= 30 s", spread >= 30)
        shown = f"{pct(delays, 50):.1f} / {pct(delays, 95):.1f} / {delays[-1]:.1f} s"
        RESULTS.append((f"{label}: back after (median / 95th / last)", shown, "", ""))
        print(f"  {RESULTS[-1][0]}: {shown}", flush=True)
        record(f"{label}: the busiest second's share of the fleet", busiest, "%", "<= 5 %",
               busiest <= 5)
        for p in procs:
            p.stdin.close()
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
    finally:
        s.close()


def _devserver_requests(log: Path) -> list[tuple[float, str, str, int]]:
    """(unix time, method, path, status) of every request the devserver answered, from its
    DEBUG log (http.server's request line, stamped by our log format); hooks left out."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        head, sep, rest = line.partition(' mash.devserver: 127.0.0.1 "')
        if not sep:
            continue
        try:
            request, _, tail = rest.partition('" ')
            method, target, _ = request.split(" ", 2)
            at = dt.datetime.strptime(head[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            status = int(tail.split()[0])
        except ValueError:
            continue
        if not target.startswith("/__replica/"):
            out.append((at, method, target.split("?")[0], status))
    return out


def _busiest(times: list[float], width: float) -> int:
    """The most of ``times`` (sorted) in any window of ``width`` s."""
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= width:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def _fleet_backend_slice(first: int, count: int, n: int, outage: float, spread: float,
                         steady: float) -> dict:
    """Gateways ``fleet-<first>`` ... ``fleet-<first + count - 1>`` of a fleet of ``n``, on
    the fleet's own schedule (gateway k boots at k / n of the boot spread), against a fresh
    replica: boot, steady, the outage, the drain. Every time in the answer is in s from the
    slice's start (T0), so slices run one after another add up to the whole fleet."""
    import shutil
    import sqlite3
    s = Scratch()
    ram = Path(tempfile.mkdtemp(prefix="mash-fleet-", dir="/dev/shm"))
    s.stoppers.append(lambda: shutil.rmtree(ram, ignore_errors=True))
    try:
        # DEBUG: the devserver logs every request line it answers, which is what is counted
        level = os.environ.get("LOG_LEVEL")
        os.environ["LOG_LEVEL"] = "DEBUG"
        try:
            server = s.devserver(profile="mash")
        finally:
            if level is None:
                os.environ.pop("LOG_LEVEL")
            else:
                os.environ["LOG_LEVEL"] = level
        for k in range(first, first + count):   # as the operator does, once per device (§9)
            server.create_device(f"fleet-{k:04d}")
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("MQTT_", "FIREBASE_", "BACKEND_", "DEVICE_"))}
        env.update(server.env(), PYTHONPATH=str(ROOT), CLOCK_SYNC="trust")
        lines: list[tuple[int, list[str]]] = []
        procs = []
        per = -(-count // FLEET["processes"])
        t0 = time.time() + 5
        for part in range(first, first + count, per):
            p = subprocess.Popen([sys.executable, str(ROOT / "bench" / "fleet_backend.py"),
                                  str(part), str(min(per, first + count - part)), str(n),
                                  str(spread), str(t0), str(ram)], env=env, cwd=str(s.dir),
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=open(s.dir / f"fleet{part}.log", "ab"), text=True)
            s.stoppers.append(lambda p=p: stop(p))
            procs.append(p)

            def read(p=p, i=len(procs) - 1):
                for line in p.stdout:
                    lines.append((i, line.split()))
            threading.Thread(target=read, daemon=True).start()

        def latest(word):
            found = {}
            for i, words in list(lines):
                if words and words[0] == word:
                    found[i] = words
            return found if len(found) == len(procs) else None

        def tell(word):
            for p in procs:
                p.stdin.write(word + "\n")
                p.stdin.flush()

        def cpu_now():
            return [cpu_seconds(p.pid) for p in (server.proc, *procs)]
        wait_for(lambda: latest("ready"), timeout=spread + 300)
        # every job has run at least once (first runs are phased over their interval)
        time.sleep(max(0.0, t0 + spread + 60 - time.time()))
        steady_from = time.time()
        cpu0 = cpu_now()
        time.sleep(steady)
        cpu = [(c - c0) / steady * 100 for c, c0 in zip(cpu_now(), cpu0)]
        down = time.time()
        server.faults(fail_next=10 ** 9, fail_status=503)
        time.sleep(outage)
        server.faults(fail_next=0)
        back = time.time()
        cpu0 = cpu_now()
        tell("mark")

        def drained():
            last = latest("pending")
            return last is not None and float(min(w[3] for w in last.values())) > back and \
                sum(int(w[2]) for w in last.values()) >= count
        wait_for(drained, timeout=outage + 900, interval=1.0)
        drained_at = min(float(w[3]) for w in latest("pending").values())
        cpu_drain = [(c - c0) / max(1.0, time.time() - back) * 100
                     for c, c0 in zip(cpu_now(), cpu0)]
        # the peak is looked for until the drain is over and a sync interval or two more
        time.sleep(max(0.0, max(drained_at + 20, back + min(120, outage)) - time.time()))
        watched = time.time()
        tell("still")                    # no new readings: what is owed goes, then compare
        since = time.time()

        def settled():
            last = latest("pending")
            return last is not None and float(min(w[3] for w in last.values())) > since + 2 \
                and sum(int(w[1]) for w in last.values()) == 0
        wait_for(settled, timeout=600, interval=1.0)
        for p in procs:
            p.stdin.close()
        for p in procs:
            p.wait(120)
        totals = collections.Counter()
        for words in (latest("stats") or {}).values():
            totals.update(json.loads(" ".join(words[1:])))
        server.stop()                    # its log is complete; its database is read below
        db = sqlite3.connect(f"file:{server.dir / 'devserver.db'}?mode=ro", uri=True)
        stored_values = db.execute('SELECT COUNT(*) FROM sensordata').fetchone()[0]
        distinct = db.execute('SELECT COUNT(*) FROM (SELECT DISTINCT sensor, timestamp '
                              'FROM sensordata)').fetchone()[0]
        owner = dict(db.execute('SELECT uid, serial_number FROM device'))
        owner.update({serial: serial for serial in list(owner.values())})
        owner.update({uid: owner.get(dev) for uid, dev in db.execute('SELECT uid, device FROM sensor')})
        db.close()
        reqs = [(at - t0, *rest) for at, *rest in _devserver_requests(server.dir / "devserver.log")]
        rel = {k: v - t0 for k, v in (("steady_from", steady_from), ("down", down),
                                      ("back", back), ("drained_at", drained_at),
                                      ("watched", watched))}
        return {"reqs": reqs, **rel, "cpu": cpu, "cpu_drain": cpu_drain, "totals": totals,
                "owner": owner, "stored_values": stored_values, "distinct": distinct}
    finally:
        s.close()


def bench_fleet_backend(quick: bool):
    """The fleet's backend half (``--gateways``, 1000; ``--quick``: 100 and a 60 s outage):
    each gateway's own worker, backend side (``bench/fleet_backend.py``: WorkerContext,
    BackendAPIClient and its pacer, the IntervalScheduler over the shipped periodic jobs run by
    Huey's own worker threads, a real store in RAM fed a line per 5 s) in a few processes,
    against the replica of the deployed MASH backend (``mash devserver --profile mash``, its
    20 requests a minute per client and URL left on). The backend answers 503 to everything
    for 10 minutes; the figures are the backend's own count of requests per second.

    ``--slices k``: the fleet in k slices run one after another on the same schedule, each
    against its own replica, their request timelines added second by second from each
    slice's start. The gateways share nothing but the backend, and the real one is not the
    ceiling; on one small machine a thousand gateways and the replica together are, which
    would flatten the very peak being measured (each slice's CPU is printed to show it is
    not)."""
    n = min(100, FLEET["gateways"]) if quick else FLEET["gateways"]
    outage = 60.0 if quick else FLEET["backend_outage"]
    spread = 20.0 if quick else FLEET["boot_spread"]
    steady = 60.0 if quick else FLEET["steady"]
    from mash.config import Settings
    slices = max(1, FLEET["slices"])
    size = -(-n // slices)
    runs = []
    for first in range(0, n, size):
        print(f"  slice: gateways {first} to {min(n, first + size) - 1} of {n}", flush=True)
        run = _fleet_backend_slice(first, min(size, n - first), n, outage, spread, steady)
        print(f"  (CPU steady: devserver {run['cpu'][0]:.0f} %, fleet processes "
              f"{sum(run['cpu'][1:]):.0f} %; from the return to drained: devserver "
              f"{run['cpu_drain'][0]:.0f} %, fleet {sum(run['cpu_drain'][1:]):.0f} %)",
              flush=True)
        runs.append(run)
    # the slices' own marks differ by the hooks' latency only: the whole fleet's windows
    steady_from = max(r["steady_from"] for r in runs)
    down = max(r["down"] for r in runs)
    back = max(r["back"] for r in runs)
    drained_at = max(r["drained_at"] for r in runs)
    watched = min(r["watched"] for r in runs)
    reqs = sorted(req for r in runs for req in r["reqs"])
    owner = {key: dev for r in runs for key, dev in r["owner"].items()}
    totals = sum((r["totals"] for r in runs), collections.Counter())
    stored_values = sum(r["stored_values"] for r in runs)
    distinct = sum(r["distinct"] for r in runs)
    per_s = collections.Counter(int(at) for at, *_ in reqs)

    def rate(a, b):
        return sum(per_s.get(k, 0) for k in range(int(a), int(b))) / max(1.0, int(b) - int(a))
    steady_rate = rate(steady_from, steady_from + steady)
    label = f"fleet of {n}, backend" + (f" ({slices} slices)" if slices > 1 else "")
    record(f"{label}: steady requests per gateway per minute", steady_rate * 60 / n, "/min")
    record(f"{label}: steady requests per second (fleet)", steady_rate, "/s")
    busy_steady = max(per_s.get(k, 0) for k in range(int(steady_from), int(steady_from + steady)))
    record(f"{label}: steady busiest second / steady rate (noise)", busy_steady / steady_rate, "x")
    record(f"{label}: CPU while steady, the devserver", max(r["cpu"][0] for r in runs), "%")
    during = [r for r in reqs if down <= r[0] < back]
    record(f"{label}: requests during the {outage:.0f} s outage, per gateway per minute",
           len(during) * 60 / n / outage, "/min")
    after = sorted(at for at, *_ in reqs if back <= at < watched)
    peak = max(per_s.get(k, 0) for k in range(int(back), int(watched)))
    peak10 = _busiest(after, 10.0) / 10
    olabel = f"after a {outage:.0f} s backend outage, {n} gateways"
    record(f"{olabel}: busiest second / steady rate", peak / steady_rate, "x", "<= 3x",
           peak / steady_rate <= 3)
    record(f"{olabel}: busiest 10 s / steady rate", peak10 / steady_rate, "x", "<= 3x",
           peak10 / steady_rate <= 3)
    record(f"{olabel}: busiest second", peak, "requests")
    record(f"{olabel}: every reading up to the return on the backend after",
           drained_at - back, "s")
    # per gateway, from the URL (its serial, its cuid or one of its sensors' ids)
    mine = collections.defaultdict(list)
    for at, method, path, status in reqs:
        if back <= at < watched:
            for part in path.split("/"):
                if part in owner:
                    mine[owner[part]].append(at)
                    break
    worst = max((_busiest(sorted(v), 60.0) for v in mine.values()), default=0)
    rpm = Settings.backend_max_rpm      # the fleet's env leaves BACKEND_MAX_RPM out: the default
    record(f"{olabel}: most requests by one gateway in any 60 s", worst, "requests",
           f"<= BACKEND_MAX_RPM ({rpm})", worst <= rpm)
    refused = sum(1 for r in reqs if r[3] == 429)
    record(f"fleet of {n}, backend: requests refused 429 (whole run)", refused, "requests",
           "0", refused == 0)
    other = collections.Counter(r[3] for r in reqs if r[3] >= 400 and r[3] not in (429, 503)
                                or r[3] == 503 and not down <= r[0] < back)
    if other:
        print(f"  other refusals: {dict(other)}", flush=True)
    expected = totals["stored"] * 3            # three metrics a reading, a sensor each
    record(f"fleet of {n}, backend: reading values lost (stored, not on the backend)",
           expected - distinct, "values", "0", expected == distinct)
    record(f"fleet of {n}, backend: values stored twice (answers lost in the outage)",
           stored_values - distinct, "values")
    print(f"  ({totals['stored']:,} readings stored, {totals['synced']:,} synced; "
          f"{len(reqs):,} requests; pacer waits {totals['paced_wait_s']:.0f} s in all)",
          flush=True)


BENCHES = {
    "reader": bench_reader_flood,
    "upload": bench_upload,
    "mqtt": bench_mqtt_roundtrip,
    "drain100k": lambda q: bench_drain(q, 20000 if q else 100000),
    "drain250k": lambda q: bench_drain(q, 50000 if q else 250000, target=10000),
    "drain_latency": lambda q: bench_drain(q, 10000 if q else 50000, latency=0.2,
                                           label=", 200 ms per response, BATCH_SIZE=50", target=1000),
    "live": bench_live_latency,
    "resources": bench_resources,
    "resources_control": lambda q: bench_resources(q, control=True),
    "sd_steps": bench_sd_steps,
    "control": bench_control,
    "export": bench_export,
    "doctor": bench_doctor,
    "dashboard": bench_dashboard,
    "backup": bench_backup,
    "update": bench_update,
    "phone": bench_phone,
    "fleet": bench_fleet,
    "fleet_backend": bench_fleet_backend,
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("names", nargs="*", help=f"some of: {', '.join(BENCHES)} (default: all)")
    p.add_argument("--quick", action="store_true", help="smaller counts, shorter windows")
    p.add_argument("--json", help="also write the table here")
    p.add_argument("--gateways", type=int, default=FLEET["gateways"],
                   help="fleet: how many gateways (default %(default)s)")
    p.add_argument("--slices", type=int, default=FLEET["slices"],
                   help="fleet_backend: run the fleet in this many slices, one after another, "
                        "and add their timelines (default %(default)s)")
    args = p.parse_args()
    FLEET["gateways"], FLEET["slices"] = args.gateways, args.slices
    import logging
    logging.basicConfig(level=logging.WARNING)
    for name in args.names or list(BENCHES):
        print(f"[{name}]", flush=True)
        BENCHES[name](args.quick)
    print("\n| figure | measured | target | |\n| --- | --- | --- | --- |")
    for name, value, target, verdict in RESULTS:
        print(f"| {name} | {value} | {target} | {verdict} |")
    if args.json:
        Path(args.json).write_text(json.dumps(RESULTS, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
