"""BACKEND_PROFILE=mash against the replica of the deployed MASH backend (CONTRACT §9): real
HTTP, the real broker, the reader on a pty and real worker processes."""
import collections
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from mash import tasks
from mash.clock import iso, parse_iso
from mash.models import Store
from mash.simulator import SimulatedBoard
from mash.sinks.backend_api import BackendAPIClient, match_sensors
from mash.sinks.errors import DeviceUnknown
from mash.tasks.sync import INFLIGHT, sensor_key, sync_readings
from tests.services import ROOT, Gateway, wait_for

SERIAL = "MASH-B2-CAL26-CE637C"
METRICS = ("temperature", "humidity", "co2")


class Farm(Gateway):
    """A simulated board, reader.py and a worker (huey_consumer) on the mash profile: the
    Gateway of tests/services.py without the RTDB stand-in (Firebase off)."""

    def __init__(self, base, backend, broker, interval=0.05, **env):
        self.dir = self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.data = base / "data"
        self.board = SimulatedBoard(interval=interval, link=base / "ttyMASH", seed=5).start(banner=False)
        self.env = {**os.environ, **backend.env(), **broker.env(), "MASH_DATA_DIR": str(self.data),
                    "DEVICE_ID": SERIAL, "SERIAL_PORT": self.board.port, "PYTHONPATH": str(ROOT),
                    "FIREBASE_DATABASE_URL": "", "SYNC_INTERVAL": "2", "COMMAND_POLL_INTERVAL": "1",
                    # a heartbeat every 5 s: 12 PATCHes a minute, under the per-URL budget (18),
                    # so the OFFLINE of a clean stop is never the one held back
                    "HEARTBEAT_INTERVAL": "5", "BACKEND_TIMEOUT": "2", "CONTROL_MODE": "off",
                    "BACKEND_MAX_RPM": "600", **env}
        self.log = open(base / "gateway.log", "ab")
        self.reader = self.worker = None

    def store(self) -> Store:
        return Store(self.data / "mash.db")


@pytest.fixture
def farm_factory(tmp_path, mash_backend, broker):
    made = []

    def make(**env):
        f = Farm(tmp_path / f"farm{len(made)}", mash_backend, broker, **env)
        made.append(f)
        return f
    yield make
    for f in made:
        f.stop()


def our_sensors(backend, serial=SERIAL) -> dict:
    """{(room, metric): sensor state} of the device on the replica."""
    state = backend.state(serial)
    return {k: s for s in state["sensors"] for k, v in match_sensors([s]).items()}, state


def uploaded(backend, serial=SERIAL) -> dict:
    """{(room, metric): [(value, timestamp), ...]} as the replica holds them."""
    sensors, state = our_sensors(backend, serial)
    return {k: [tuple(x) for x in state["readings"].get(s["id"], [])] for k, s in sensors.items()}


def stored(store: Store) -> dict:
    """{(room, metric): [(value, timestamp)]} of every reading in the store."""
    out = {}
    for r in store.m.SensorData.select().order_by(store.m.SensorData.id):
        for m in METRICS:
            out.setdefault((r.room, m), []).append((getattr(r, m), iso(r.timestamp)))
    return out


def norm(rows) -> list:
    """(value, timestamp) pairs comparable across the two sides: floats, parsed times."""
    return sorted((float(v), parse_iso(t)) for v, t in rows)


def same_readings(backend_side: list, store_side: list) -> bool:
    """Each stored reading is on the backend exactly once."""
    return norm(backend_side) == norm(store_side)


def test_fresh_gateway_registers_reports_status_and_uploads_each_reading_once(farm_factory, mash_backend):
    device = mash_backend.create_device(SERIAL, name="Grow room A")
    farm = farm_factory()
    farm.start_reader()
    farm.start_worker()
    store = farm.store()
    wait_for(lambda: mash_backend.state(SERIAL)["devices"][0]["status"] == "ONLINE", timeout=30,
             what="heartbeat ONLINE")
    dev = mash_backend.state(SERIAL)["devices"][0]
    assert dev["id"] == device["id"]
    assert dev["ipAddress"] == "127.0.0.1" and dev["firmware"].startswith("MASH gateway ")
    wait_for(lambda: mash_backend.state(SERIAL)["health"], timeout=30, what="health posted")
    health = mash_backend.state(SERIAL)["health"][-1]
    assert health["uptime"] >= 0 and "diskUsage" in health and "networkLatency" in health
    wait_for(lambda: store.m.SensorData.select().count() >= 600, timeout=60, what="300 lines")
    farm.board.paused = True
    time.sleep(0.5)
    wait_for(lambda: store.pending_count() == 0, timeout=60, what="backlog drained")
    up, mine = uploaded(mash_backend), stored(store)
    assert set(up) == set(mine) and len(up) == 6        # 2 rooms x 3 metrics, created by us
    for key in mine:
        assert same_readings(up[key], mine[key]), key
    assert store.counters().get("sync_resent_unanswered", 0) == 0
    out = farm.mash("status")
    assert f"{SERIAL} is device {device['id']}" in out.stdout, out.stdout
    farm.worker.send_signal(signal.SIGTERM)
    farm.worker.wait(30)
    assert mash_backend.state(SERIAL)["devices"][0]["status"] == "OFFLINE"


def test_unknown_serial_is_a_clear_state_and_the_backlog_drains_once_the_device_exists(
        farm_factory, mash_backend):
    farm = farm_factory(SYNC_INTERVAL="1")
    farm.start_reader()
    farm.start_worker()
    store = farm.store()
    wait_for(lambda: store.m.SensorData.select().count() >= 100, timeout=30, what="readings")
    wait_for(lambda: "NOT REGISTERED" in farm.mash("status").stdout, timeout=30, what="status line")
    out = farm.mash("status").stdout
    assert f"ask the MASH admin to create device {SERIAL}" in out, out
    # the fall-back bug handed back the other farm's device: refused, nothing uploaded to it
    assert not any(s["readings"] for s in mash_backend.state("MASH-OTHER-FARM-0001")["sensors"])
    assert farm.worker.poll() is None and farm.reader.poll() is None
    assert store.pending_count() > 0
    logs = farm.logs()
    assert logs.count("ask the MASH admin to create device") == 1, logs[-3000:]
    assert "Traceback" not in logs
    doctor = farm.mash("doctor")
    assert f"the MASH backend has no device {SERIAL}" in doctor.stdout, doctor.stdout

    mash_backend.create_device(SERIAL)
    # the running worker asks again after REGISTER_RETRY (5 min); a restarted one at once
    farm.worker.send_signal(signal.SIGTERM)
    farm.worker.wait(30)
    farm.start_worker()
    farm.board.paused = True
    time.sleep(0.5)
    wait_for(lambda: store.pending_count() == 0, timeout=60, what="backlog drained")
    up, mine = uploaded(mash_backend), stored(store)
    for key in mine:
        assert same_readings(up[key], mine[key]), key
    assert f"is device" in farm.mash("status").stdout


def test_a_large_backlog_drains_under_the_guest_limit_without_a_429(tmp_path, mash_backend,
                                                                   make_settings):
    mash_backend.create_device(SERIAL)
    settings = make_settings(**mash_backend.env(), DEVICE_ID=SERIAL, BACKEND_MAX_RPM="60")
    store = Store(settings.db_path)
    t0 = time.time() - 10_000 * 5
    with store.transaction():
        for i in range(10_000):              # 10,000 lines: 20,000 readings, 60,000 values
            store.save_sensor_data({"fruiting": {"temp": 24 + (i % 7) / 10, "humidity": 85.0, "co2": 800},
                                    "spawning": {"temp": 28.0, "humidity": 72 + (i % 5), "co2": 3000}},
                                   timestamp=t0 + 5 * i)
    assert store.pending_count() == 20_000
    tasks.huey.immediate = True
    ctx = tasks.WorkerContext(settings, store=store, mqtt=None, firebase=None)
    started = time.monotonic()
    try:
        while store.pending_count():
            try:
                sync_readings(ctx)
            except Exception as exc:        # the budget said wait: as Huey's retry would
                assert getattr(exc, "retry_after", None), exc
                time.sleep(min(exc.retry_after, 10))
    finally:
        took = time.monotonic() - started
        ctx.close()
        tasks.huey.immediate = False
    state = mash_backend.state(SERIAL)
    assert state["throttled"] == 0, state["throttled"]
    up, mine = uploaded(mash_backend), stored(store)
    for key in mine:
        assert same_readings(up[key], mine[key]), key
    # 10 batches per sensor URL, 60 in all: within a minute at BACKEND_MAX_RPM=60
    assert took < 180, took


def test_backend_and_mqtt_commands_switch_the_relay_once_each(farm_factory, mash_backend, broker):
    device = mash_backend.create_device(SERIAL)
    farm = farm_factory()
    farm.start_reader()
    farm.start_worker()
    wait_for(lambda: farm.store().meta_get("backend.identity", {}).get("cuid") == device["id"],
             timeout=30, what="registered")
    cmd = mash_backend.issue(device["id"], "START", {"actuator": "MIST_MAKER"})
    wait_for(lambda: farm.board.actuators["MIST_MAKER"] == "ON", timeout=20, what="relay ON")
    ledger = farm.store().m.Command
    wait_for(lambda: ledger.get_or_none(ledger.command_id == cmd["commandId"]) is not None, timeout=10, what="ledger")
    assert ledger.get(ledger.command_id == cmd["commandId"]).source == "backend"

    observer = broker.observer(topics=(f"devices/{device['id']}/#", f"devices/{SERIAL}/#"))
    try:
        payload = json.dumps({"command": "STOP", "parameters": {"actuator": "mist_maker", "room": "fruiting"},
                              "timestamp": "2026-12-02T10:00:00.000Z"})
        wait_for(lambda: farm.mash("status").returncode == 0, timeout=5)
        time.sleep(1.0)      # the worker subscribed its topics when it registered
        for _ in range(2):  # QoS 0 from the backend: a redelivery is the same bytes
            observer.publish(f"devices/{device['id']}/command", payload, qos=0)
        wait_for(lambda: farm.board.actuators["MIST_MAKER"] == "OFF", timeout=20, what="relay OFF")
        time.sleep(2.0)      # room for a second run, if there were one
        mist = [line for line in farm.board.received if b"MIST_MAKER" in line]
        assert [json.loads(line)["state"] for line in mist] == ["ON", "OFF"], mist
        mq = [c for c in ledger.select() if c.command_id.startswith("mq-")]
        assert len(mq) == 1 and mq[0].status == "completed", [(c.command_id, c.status) for c in mq]
        wait_for(lambda: [a for a in observer.on(f"{SERIAL}/command_ack") if a["id"] == mq[0].command_id],
                 timeout=15, what="ack on MQTT")
        # the backend has no ack route: nothing was sent to one, and nothing stays owed
        assert not farm.store().has_undelivered(sinks=("backend",))
        # its MQTT topics hear status and readings
        wait_for(lambda: observer.on(f"{device['id']}/status"), timeout=15, what="status relay")
        wait_for(lambda: observer.on(f"{device['id']}/data"), timeout=15, what="data relay")
    finally:
        observer.close()


def test_kill_9_mid_upload_duplicates_only_an_unanswered_batch_and_counts_it(farm_factory, mash_backend):
    mash_backend.create_device(SERIAL)
    farm = farm_factory(SYNC_INTERVAL="3600")
    farm.start_reader()
    store = farm.store()
    wait_for(lambda: store.m.SensorData.select().count() >= 2400, timeout=90, what="a backlog")
    farm.board.paused = True
    time.sleep(0.5)
    # the replica stores the next batch and drops the connection before answering (a 201
    # lost on the way); the worker is killed right after, its bookkeeping unfinished
    mash_backend.faults(lose_answer_next=1, lose_path="/data/batch")
    farm.start_worker()
    # an hour's interval: the first sync after a start waits its phase, so ask for it as a
    # grower would (`mash sync`)
    assert farm.mash("sync").returncode == 0
    wait_for(lambda: mash_backend.state(SERIAL)["lost"] >= 1, timeout=60, interval=0.02,
             what="an answer lost")
    assert store.meta_get(INFLIGHT)                 # the batch is still written down in flight
    farm.worker.send_signal(signal.SIGKILL)
    farm.worker.wait(10)
    farm.start_worker()
    assert farm.mash("sync").returncode == 0
    wait_for(lambda: store.pending_count() == 0, timeout=90, what="drained after the kill")
    up, mine = uploaded(mash_backend), stored(store)
    extra = 0
    for key in mine:
        have, want = norm(up[key]), norm(mine[key])
        assert len(have) >= len(want)
        assert not (collections.Counter(want) - collections.Counter(have)), key   # none missing
        extra += len(have) - len(want)
    counted = store.counters().get("sync_resent_unanswered", 0)
    assert 0 < extra <= counted, (extra, counted)
    assert extra <= 1000                     # at most the one batch in flight
