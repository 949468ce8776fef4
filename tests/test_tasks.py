"""Task logic in Huey immediate mode against the reference backend, mosquitto and the RTDB
stand-in."""
import datetime as dt
import logging
import json
import time

import pytest
from huey.exceptions import RetryTask

from mash import tasks
from mash.clock import utcnow
from mash.sinks.backend_api import RetryableError
from mash.tasks import delivery, status, sync
from mash.tasks.context import WorkerContext
from mash.tasks.intake import intake, poll_commands
from mash.tasks.queue import run_job
from tests.services import wait_for

DEVICE = "rpi_gateway_001"


def add_backlog(store, lines, start=None):
    """Store ``lines`` reading lines quickly (two rooms each), as the reader would."""
    start = start or utcnow() - dt.timedelta(days=7)
    rows = []
    for i in range(lines):
        ts = start + dt.timedelta(seconds=5 * i)
        key = ts.strftime("%Y-%m-%dT%H-%M-%S")
        rows.append(dict(room="fruiting", temperature=24.0, humidity=85.0, co2=800 + i % 100,
                         timestamp=ts, fb_key=key))
        rows.append(dict(room="spawning", temperature=28.0, humidity=70.0, co2=900 + i % 100,
                         timestamp=ts, fb_key=key))
    with store.transaction():
        for k in range(0, len(rows), 400):
            store.m.SensorData.insert_many(rows[k:k + 400]).execute()


def backend_ids(devserver):
    return devserver.state(DEVICE)["reading_ids"]


def test_backlog_of_10000_readings_drains_in_one_sync_run(gateway):
    add_backlog(gateway.store, 5000)
    t0 = time.monotonic()
    tasks.sync_readings()
    took = time.monotonic() - t0
    assert gateway.store.pending_count() == 0
    ids = backend_ids(gateway.devserver)
    assert len(ids) == 10000 == len(set(ids))
    S = gateway.store.m.SensorData
    expected = {gateway.store.reading_id(r.id) for r in S.select(S.id)}
    assert set(ids) == expected
    print(f"drained 10,000 readings in {took:.2f} s ({10000 / took:.0f} readings/s)")


def test_a_503_mid_drain_leaves_only_the_failed_batch_and_a_retry_finishes_it(gateway):
    gateway.settings = gateway.settings.with_(batch_size=100)
    add_backlog(gateway.store, 100)          # 200 readings: 2 batches of 100 (no large-backlog mode)
    gateway.store.pending_count()
    sync.ensure_registered(gateway)
    gateway.devserver.faults(fail_next=1, fail_after=0)
    with pytest.raises(RetryableError):
        sync.sync_readings(gateway)
    S = gateway.store.m.SensorData
    pending = S.select().where(S.synced == 0)
    assert pending.count() == 100 and [r.id for r in pending] == list(range(1, 101))
    assert sync.sync_readings(gateway) == 100      # the retry
    assert gateway.store.pending_count() == 0
    assert len(backend_ids(gateway.devserver)) == 200


def test_huey_retries_a_failed_sync_after_a_jittered_wait(gateway):
    add_backlog(gateway.store, 10)
    gateway.devserver.faults(fail_next=50)
    tasks.sync_readings()                       # immediate mode: the retry is scheduled, not run
    scheduled = tasks.huey.scheduled()
    assert [t.name for t in scheduled] == ["sync_readings"]
    # the first retry's window is the task's 5 s (test_task_retries_wait_a_full_jitter_draw...)
    wait = (scheduled[0].eta - dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)).total_seconds()
    assert scheduled[0].retries == 3 and -1 <= wait <= 5, wait
    gateway.devserver.faults(fail_next=0)
    tasks.huey.storage.flush_schedule()


def test_429_becomes_a_retry_after_exactly_retry_after(gateway, devserver_factory):
    add_backlog(gateway.store, 600)
    sync.ensure_registered(gateway)
    gateway.devserver.faults(rate_limit=2, rate_window=3)
    with pytest.raises(RetryTask) as err:
        run_job(sync.sync_readings, gateway)
    assert err.value.delay >= 1
    assert gateway.store.pending_count() == 1200 - 2 * 500


def test_an_expired_access_token_mid_drain_costs_no_batch(make_settings, devserver_factory, store):
    server = devserver_factory(access_ttl=1, refresh_ttl=3)
    rt = WorkerContext(make_settings(**server.env(), BATCH_SIZE="20"), store=store)
    rt.drain_batch = 20
    add_backlog(store, 300)
    sync.ensure_registered(rt)
    server.faults(latency=0.1)                  # 30 batches of 20, ~10 a second: tokens die mid-drain
    t0 = time.monotonic()
    assert sync.sync_readings(rt) == 600        # one run, no batch lost or refused
    assert time.monotonic() - t0 > 3
    assert store.m.SensorData.select().where(store.m.SensorData.synced == -1).count() == 0
    assert len(backend_ids(server)) == 600


def test_a_refused_reading_is_the_only_one_rejected_and_retry_rejected_sends_it_alone(gateway):
    gateway.settings = gateway.settings.with_(batch_size=10)
    add_backlog(gateway.store, 15)
    S = gateway.store.m.SensorData
    S.update(room="cellar").where(S.id == 12).execute()       # the backend refuses it
    assert sync.sync_readings(gateway) == 29
    assert [r.id for r in S.select().where(S.synced == -1)] == [12]
    assert S.select().where(S.synced == 1).count() == 29
    assert "room must be one of" in gateway.store.meta_get("last_rejection")["reason"]
    assert gateway.store.get_stats()["rejected_records"] == 1
    assert gateway.store.retry_rejected() == 1
    assert sync.sync_readings(gateway) == 0                   # still refused: it alone
    assert [r.id for r in S.select().where(S.synced == -1)] == [12]
    assert S.select().where(S.synced == 1).count() == 29
    ids = backend_ids(gateway.devserver)
    assert len(ids) == 29 == len(set(ids))
    assert gateway.store.counters()["sync_rejected"] == 2      # once per attempt, counted


def test_one_poisoned_reading_among_500_is_the_only_one_rejected(gateway):
    add_backlog(gateway.store, 250)                # 500 readings: one request of the drain's 500
    poisoned = gateway.store.reading_id(137)
    gateway.devserver.faults(refuse_ids=[poisoned])
    assert sync.sync_readings(gateway) == 499
    S = gateway.store.m.SensorData
    assert [r.id for r in S.select().where(S.synced == -1)] == [137]
    assert S.select().where(S.synced == 1).count() == 499 and gateway.store.pending_count() == 0
    ids = backend_ids(gateway.devserver)
    everyone = {gateway.store.reading_id(r.id) for r in S.select(S.id)}
    assert len(ids) == 499 == len(set(ids)) and set(ids) == everyone - {poisoned}
    rejection = gateway.store.meta_get("last_rejection")
    assert rejection["first_id"] == 137 and rejection["count"] == 1
    assert f"(id {poisoned}) refused" in rejection["reason"]
    assert gateway.store.counters()["sync_rejected"] == 1
    uploads = gateway.devserver.state()["uploads"]
    assert uploads[0] == [500, 400] and len(uploads) == 1 + 2 * 9       # 9 halvings, 2 each
    assert sum(n for n, status in uploads if status == 201) == 499
    assert [n for n, status in uploads if status == 400][-1] == 1     # isolated down to it


def test_a_413_halves_the_request_for_the_rest_of_the_run(gateway):
    add_backlog(gateway.store, 300)                # 600 readings: the drain's 500, then 100
    gateway.devserver.faults(max_readings=100)     # the backend's limit is lower than we knew
    assert sync.sync_readings(gateway) == 600
    uploads = [tuple(u) for u in gateway.devserver.state()["uploads"]]
    assert uploads[:3] == [(500, 413), (250, 413), (125, 413)]
    assert all(status == 201 and n <= 63 for n, status in uploads[3:])
    assert sum(n for n, _ in uploads[3:]) == 600
    S = gateway.store.m.SensorData
    assert S.select().where(S.synced == -1).count() == 0
    assert len(set(backend_ids(gateway.devserver))) == 600
    # a single reading refused as too large is the data: it alone is set aside
    add_backlog(gateway.store, 1, start=utcnow() - dt.timedelta(days=1))
    gateway.devserver.faults(max_readings=0)
    assert sync.sync_readings(gateway) == 0
    assert [tuple(u) for u in gateway.devserver.state()["uploads"][-3:]] == [(2, 413), (1, 413),
                                                                              (1, 413)]
    assert [r.id for r in S.select().where(S.synced == -1)] == [601, 602]
    assert "413" in gateway.store.meta_get("last_rejection")["reason"]


def test_no_request_carries_more_readings_than_the_backend_takes(make_settings, devserver, store):
    ctx = WorkerContext(make_settings(**devserver.env(), BATCH_SIZE="1000"), store=store,
                        mqtt=None, firebase=None)
    ctx.drain_batch = 5000
    add_backlog(store, 2500)                       # 5000 readings
    assert sync.sync_readings(ctx) == 5000
    assert [tuple(u) for u in devserver.state()["uploads"]] == [(1000, 201)] * 5
    assert store.m.SensorData.select().where(store.m.SensorData.synced == -1).count() == 0


def test_a_404_that_survives_registering_again_ends_the_run_and_keeps_every_reading(gateway,
                                                                                     caplog):
    S = gateway.store.m.SensorData
    add_backlog(gateway.store, 5)                   # 10 readings, one request
    sync.ensure_registered(gateway)
    # the backend forgot the device once: registered again, and the upload goes through
    gateway.devserver.faults(fail_next=1, fail_status=404, fail_path="/sensors/data")
    assert sync.sync_readings(gateway) == 10
    # now every upload is answered 404: one registration per run, then the run ends
    add_backlog(gateway.store, 5, start=utcnow() - dt.timedelta(days=1))
    gateway.devserver.faults(fail_next=40, fail_status=404, fail_path="/sensors/data")
    before = gateway.devserver.state()["requests"]
    with caplog.at_level("INFO", logger="mash.worker"):
        assert sync.sync_readings(gateway) == 0
        assert sync.sync_readings(gateway) == 0
    # per run: the upload, the registration (409: still ours), the upload again
    assert gateway.devserver.state()["requests"] - before == 2 * 3
    assert gateway.store.pending_count() == 10 and S.select().where(S.synced == -1).count() == 0
    gone = [r for r in caplog.records if "even after registering" in r.getMessage()]
    assert len(gone) == 1 and gone[0].levelname == "ERROR"
    assert "404 after registering again" in gateway.store.sink("backend").last_error
    gateway.devserver.faults(fail_next=0)
    assert sync.sync_readings(gateway) == 10
    assert len(set(backend_ids(gateway.devserver))) == 20


def run_due_retries(name: str) -> int:
    """Run the retries of ``name`` that are due (Huey immediate mode only schedules them)."""
    due = [t for t in tasks.huey.read_schedule() if t.name == name]
    for task in due:
        tasks.huey.execute(task)
    return len(due)


def test_a_401_for_a_while_mid_drain_rejects_nothing_and_every_reading_arrives_once(gateway):
    gateway.backend.login_backoff = (0.5, 2.0)     # the lockout is seconds here, not an hour
    add_backlog(gateway.store, 600)                # 1200 readings: requests of 500, 500, 200
    sync.ensure_registered(gateway)
    # the first upload goes through; then 401 to everything (login and refresh too) for 3 s
    gateway.devserver.faults(unauthorized_for=3, unauthorized_after=1)
    tasks.sync_readings()                          # fails; its retry is scheduled
    S = gateway.store.m.SensorData
    assert S.select().where(S.synced == -1).count() == 0
    assert S.select().where(S.synced == 1).count() == 500 and gateway.store.pending_count() == 700
    assert gateway.store.get_stats()["pending_records"] == 700
    assert [t.name for t in tasks.huey.scheduled()] == ["sync_readings"]
    refused = gateway.devserver.state()["faults"]["unauthorized"]
    assert refused == ["POST /sensors/data", "POST /auth/refresh", "POST /auth/login"]
    sent = gateway.devserver.state()["requests"]
    with pytest.raises(RetryableError):            # inside the login backoff: nothing is sent
        sync.sync_readings(gateway)
    assert gateway.devserver.state()["requests"] == sent
    A = gateway.store.m.Alert
    assert [(a.event_type, a.state, a.severity) for a in A.select()] == [
        ("backend_auth", "raised", "CRITICAL")]
    wait_for(lambda: run_due_retries("sync_readings") and gateway.store.pending_count() == 0,
             timeout=30, interval=0.1, what="Huey's retries drained the backlog after the 401s")
    assert S.select().where(S.synced == -1).count() == 0
    ids = backend_ids(gateway.devserver)
    assert len(ids) == 1200 == len(set(ids))
    assert set(ids) == {gateway.store.reading_id(r.id) for r in S.select(S.id)}
    assert [(a.event_type, a.state) for a in A.select()] == [("backend_auth", "raised"),
                                                            ("backend_auth", "cleared")]
    refused = gateway.devserver.state()["faults"]["unauthorized"]
    assert set(refused[3:]) <= {"POST /auth/login"}      # each later attempt: one login, no more
    owed = [(o.ref, o.sink) for o in gateway.store.owed("backend")]
    assert owed == [("1", "backend"), ("2", "backend")]  # the alert and its clearing, to send
    tasks.huey.storage.flush_schedule()


def test_firebase_backup_has_its_own_progress_and_never_holds_back_the_backend(gateway):
    add_backlog(gateway.store, 30)
    gateway.rtdb.stop()                                          # Firebase away
    with pytest.raises(RetryableError):
        sync.backup_firebase(gateway)
    assert sync.sync_readings(gateway) == 60                     # the backend is not held back
    assert gateway.store.get_stats()["firebase_lag_records"] == 60
    from tests.services import RTDBStandIn
    import os
    rtdb = RTDBStandIn().start()
    os.environ["FIREBASE_DATABASE_EMULATOR_HOST"] = rtdb.host
    try:
        from mash.sinks.firebase import FirebaseSync
        gateway.firebase = FirebaseSync(gateway.settings)
        assert sync.backup_firebase(gateway) == 60
        assert sync.backup_firebase(gateway) == 0
        tree = rtdb.tree["sensor_data"]
        assert len(tree["fruiting"]) == 30 and len(tree["spawning"]) == 30
        assert len(rtdb.writes()) == 1
        assert gateway.store.get_stats()["firebase_lag_records"] == 0
    finally:
        rtdb.stop()


def test_a_duplicate_command_id_from_both_channels_runs_once(gateway, observer):
    gateway.start()
    wait_for(gateway.mqtt.is_alive, what="MQTT up")
    cmd = gateway.devserver.issue(DEVICE, "set_actuator", {"actuator": "MIST_MAKER", "state": "ON"},
                                  id="dup-1")
    observer.publish(f"devices/{DEVICE}/commands", {"id": "dup-1", "command": "set_actuator",
                                                     "parameters": cmd["parameters"]})
    wait_for(lambda: gateway.store.m.Command.select().where(gateway.store.m.Command.command_id == "dup-1").exists(), what="ledger")
    assert poll_commands(gateway) == 0
    observer.publish(f"devices/{DEVICE}/commands", {"id": "dup-1", "command": "set_actuator",
                                                     "parameters": cmd["parameters"]})
    wait_for(lambda: gateway.store.counters().get("command.duplicate", 0) >= 2, what="duplicates counted")
    assert gateway.store.m.Command.select().where(gateway.store.m.Command.command_id == "dup-1").count() == 1


def test_rejected_commands_are_acked_failed_with_the_reason(gateway, observer):
    gateway.start()
    wait_for(gateway.mqtt.is_alive, what="MQTT up")
    past = (utcnow() - dt.timedelta(minutes=1)).isoformat() + "Z"
    cases = {
        "c-expired": ({"command": "set_actuator", "parameters": {"actuator": "MIST_MAKER", "state": "ON"},
                       "expiresAt": past}, "expired"),
        "c-unknown": ({"command": "self_destruct"}, "unknown command"),
        "c-malformed": ({"command": "set_actuator", "parameters": {"actuator": "TOASTER", "state": "ON"}},
                        "malformed"),
        "c-state": ({"command": "set_actuator", "parameters": {"actuator": "MIST_MAKER", "state": "HALF"}},
                    "malformed"),
        "c-oversize": ({"command": "REQUEST_STATUS", "parameters": {"pad": "x" * 5000}}, "oversize"),
        "c-other": ({"command": "REQUEST_STATUS", "deviceId": "someone_else"}, "addressed to device"),
    }
    for cid, (body, _) in cases.items():
        observer.publish(f"devices/{DEVICE}/commands", {"id": cid, **body})
    for raw in (b"not json", b"[1,2]", json.dumps({"command": "REQUEST_STATUS"}).encode(),
                json.dumps({"id": 7, "command": "REQUEST_STATUS"}).encode()):
        observer.publish(f"devices/{DEVICE}/commands", raw)
    # over 256 KiB: not parsed whole, but its id is read and it is acknowledged failed
    observer.publish(f"devices/{DEVICE}/commands", json.dumps(
        {"id": "c-huge", "command": "REQUEST_STATUS", "parameters": {"pad": "x" * 300_000}}).encode())
    cases["c-huge"] = ({}, "oversize")
    wait_for(lambda: len(observer.on("/command_ack")) >= len(cases), timeout=15, what="failed acks")
    acks = {a["id"]: a for a in observer.on("/command_ack")}
    for cid, (_, reason) in cases.items():
        assert acks[cid]["status"] == "failed" and reason in acks[cid]["response"]["reason"], cid
    counters = gateway.store.counters()
    assert counters["bad_command.bad_json"] == 1 and counters["bad_command.not_object"] == 1
    assert counters["bad_command.no_usable_id"] == 2
    assert not gateway.store.m.Command.select().where(gateway.store.m.Command.status.in_(["queued", "running"])).exists()
    # backend side: unknown to the backend, so its 404 is recorded, not retried
    wait_for(lambda: not gateway.store.owed("backend"), what="backend acks")
    O = gateway.store.m.Outbox
    assert all("404" in (o.error or "") for o in O.select().where(O.sink == "backend"))


def test_worker_commands_request_status_force_sync_configure(gateway, observer):
    gateway.start()
    wait_for(gateway.mqtt.is_alive, what="MQTT up")
    add_backlog(gateway.store, 5)
    assert intake(gateway, {"id": "s1", "command": "REQUEST_STATUS"}, "mqtt") == "done"
    assert intake(gateway, {"id": "s2", "command": "force_sync"}, "mqtt") == "done"
    assert intake(gateway, {"id": "s3", "command": "CONFIGURE", "parameters": {
        "thresholds": {"fruiting": {"temp_max": 27}}, "sync_interval": 30}}, "mqtt") == "done"
    assert intake(gateway, {"id": "s4", "command": "CONFIGURE", "parameters": {
        "thresholds": {"cellar": {"temp_max": 27}}}}, "mqtt") == "failed"
    wait_for(lambda: gateway.store.pending_count() == 0, what="force_sync drained")
    assert gateway.store.meta_get("configuration") == {"thresholds": {"fruiting": {"temp_max": 27}},
                                                       "sync_interval": 30}
    assert gateway.intervals["sync"] == 30
    status = json.loads(gateway.store.m.Command.get(gateway.store.m.Command.command_id == "s1").response)["stats"]
    assert status["pending_records"] == 10
    wait_for(lambda: {a["id"] for a in observer.on("/command_ack")} >= {"s1", "s2", "s3", "s4"},
             what="acks")


def test_alerts_are_delivered_once_per_sink(gateway, observer):
    gateway.start()
    wait_for(gateway.mqtt.is_alive, what="MQTT up")
    from mash.alerts import AlertEvent
    gateway.store.add_alerts([AlertEvent("high_co2", "CRITICAL", "fruiting", 1600, 1500, "raised",
                                         "fruiting co2 1600 ppm is above 1500 ppm"),
                              AlertEvent("high_co2", "CRITICAL", "fruiting", 1400, 1500, "cleared",
                                         "fruiting co2 back to 1400 ppm")])
    tasks.deliver()
    wait_for(lambda: not gateway.store.owed("mqtt"), what="PUBACKs")
    tasks.deliver()
    delivery.deliver_owed(gateway)
    wait_for(lambda: len(observer.on("/alerts")) >= 2 and len(gateway.devserver.state()["alerts"]) >= 2
             and not gateway.store.owed("backend") and not gateway.store.owed("mqtt"),
             what="both alerts at both sinks")
    backend = gateway.devserver.state()["alerts"]
    assert [(a["eventType"], a["severity"]) for a in backend] == [("high_co2", "CRITICAL"),
                                                                 ("high_co2_cleared", "INFO")]
    assert backend[0]["data"] == {"room": "fruiting", "value": 1600, "threshold": 1500}
    mqtt = observer.on("/alerts")
    assert [a["type"] for a in mqtt] == ["high_co2", "high_co2_cleared"]
    assert len({a["id"] for a in mqtt}) == 2


def test_heartbeat_registers_then_reports_status_everywhere(gateway, observer):
    gateway.start()
    wait_for(gateway.mqtt.is_alive, what="MQTT up")
    add_backlog(gateway.store, 3)
    stats = status.heartbeat(gateway)
    device = gateway.devserver.state()["devices"][0]
    assert device["serialNumber"] == DEVICE and device["status"] == "ONLINE"
    assert device["metadata"]["pending_records"] == 6 == stats["pending_records"]
    wait_for(lambda: [s for s in observer.on("/status") if s.get("pending_records") == 6], what="status")
    fb_status = gateway.rtdb.tree["devices"][DEVICE]["status"]      # CONTRACT §8's object
    assert fb_status["status"] == "ONLINE" and fb_status["metadata"]["pending_records"] == 6
    assert gateway.store.get_stats()["backend_online"] is True


def test_live_feed_publishes_new_readings_fast_and_does_not_replay(gateway, observer):
    add_backlog(gateway.store, 3)              # stored before the broker link: not replayed
    gateway.start()
    wait_for(gateway.mqtt.is_alive, what="MQTT up")
    time.sleep(0.3)
    t0 = time.monotonic()
    gateway.store.save_sensor_data({"fruiting": {"temp": 24.1, "humidity": 85, "co2": 801},
                                    "spawning": {"temp": 28.1, "humidity": 70, "co2": 901}})
    msg = wait_for(lambda: observer.on("/sensor_data"), timeout=5, interval=0.005, what="live reading")
    latency = time.monotonic() - t0
    assert len(msg) == 1 and msg[0]["fruiting"]["co2"] == 801 and msg[0]["spawning"]["co2"] == 901
    assert msg[0]["readingId"] == gateway.store.reading_id(7)
    print(f"store -> MQTT subscriber: {latency * 1000:.0f} ms")
    assert latency < 2.0          # a sanity bound; the figure itself is measured in bench/


def test_no_new_sync_is_enqueued_while_a_retry_of_one_is_pending(gateway, caplog):
    from mash.tasks.schedule import IntervalScheduler
    add_backlog(gateway.store, 10)
    sync.ensure_registered(gateway)
    gateway.devserver.faults(fail_next=50)
    scheduler = IntervalScheduler(gateway, tasks.periodic_jobs(), tasks._busy_job)
    with caplog.at_level("DEBUG", logger="mash"):
        assert "sync" in scheduler.step(time.monotonic(), {"sync"})     # runs, fails, retry scheduled
        syncs = lambda: [t for t in tasks.huey.scheduled() if t.name == "sync_readings"]  # noqa: E731
        assert len(syncs()) == 1
        for _ in range(3):                                               # the outage goes on
            assert "sync" not in scheduler.step(time.monotonic() + 3600, {"sync"})
    assert len(syncs()) == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors and not any(r.exc_info for r in caplog.records if r.levelno > logging.DEBUG)
    gateway.devserver.faults(fail_next=0)
    tasks.huey.storage.flush_schedule()


def test_backend_hears_offline_on_a_clean_stop_and_error_when_the_board_is_lost(make_settings,
                                                                                 devserver):
    ctx = WorkerContext(make_settings(**devserver.env()), mqtt=None, firebase=None)
    lost = "2026-01-01T00:00:00.000Z"
    ctx.store.beat("reader", 60, board={"connected": False, "since": lost, "port": None,
                                        "problem": "no board found"})
    status.heartbeat(ctx)
    device = devserver.state()["devices"][0]
    assert device["status"] == "ERROR"
    assert "board lost since " + lost in device["metadata"]["error"]
    ctx.store.beat("reader", 60, board={"connected": True, "since": lost, "port": "/dev/ttyACM0",
                                        "problem": None})
    status.heartbeat(ctx)
    assert devserver.state()["devices"][0]["status"] == "ONLINE"
    ctx.close()
    assert devserver.state()["devices"][0]["status"] == "OFFLINE"
    assert ctx.store.processes()["worker"]["stopped"] is True


def test_device_status_waits_five_minutes_before_error():
    now = dt.datetime(2026, 11, 27, 12, 0, 0)
    board = lambda since: {"reader": {"alive": True, "age_s": 1, "at": "", "board": {  # noqa: E731
        "connected": False, "since": since, "problem": "unplugged"}}}
    assert status.device_status(board("2026-11-27T11:56:00.000Z"), now) == ("ONLINE", None)
    assert status.device_status(board("2026-11-27T11:55:00.000Z"), now)[0] == "ERROR"
    dead = {"reader": {"alive": False, "age_s": 400, "at": "2026-11-27T11:53:20.000Z"}}
    assert status.device_status(dead, now)[0] == "ERROR"
    assert status.device_status({}, now) == ("ONLINE", None)


def test_a_fleets_first_runs_are_spread_over_the_interval_by_serial_and_stable_per_device():
    from mash.tasks.schedule import phase
    serials = [f"MASH-{n:06d}" for n in range(1000)]
    first = [phase(s, "sync", 60.0) for s in serials]
    assert all(0.0 <= p < 60.0 for p in first)
    assert first == [phase(s, "sync", 60.0) for s in serials], "the same device, the same phase"
    # uniform: every 6 s tenth of the minute holds 5-15 % of the fleet, no second more than 5 %
    tenths = [sum(1 for p in first if k * 6 <= p < (k + 1) * 6) for k in range(10)]
    assert all(50 <= n <= 150 for n in tenths), tenths
    assert max(sum(1 for p in first if k <= p < k + 1) for k in range(60)) <= 50
    # each job of one device its own phase: a device does not sync and poll at the same moment
    assert phase("MASH-000001", "sync", 60.0) != phase("MASH-000001", "poll", 60.0)


def test_the_scheduler_waits_each_phased_jobs_phase_before_its_first_run(gateway):
    from mash.tasks.schedule import IntervalScheduler, phase
    add_backlog(gateway.store, 3)
    scheduler = IntervalScheduler(gateway, tasks.periodic_jobs(), tasks._busy_job)
    start = time.monotonic()
    wait = phase(gateway.settings.device_id, "sync", gateway.intervals["sync"])
    assert wait > 1.0, "this device's phase is not trivially short"
    assert "sync" not in scheduler.step(start + wait - 0.5, set())
    assert "sync" in scheduler.step(start + wait + 0.01, set())
    tasks.huey.storage.flush_queue()


def test_the_heartbeat_runs_soon_after_start_then_at_its_phase(gateway):
    from mash.tasks.schedule import IntervalScheduler, phase
    scheduler = IntervalScheduler(gateway, tasks.periodic_jobs(), lambda job: False)
    start = time.monotonic()
    assert "heartbeat" in scheduler.step(start + 2.1, set())            # ONLINE at once
    gap = phase(gateway.settings.device_id, "heartbeat", gateway.intervals["heartbeat"])
    other = phase("MASH-A1-OTH26-000001", "heartbeat", gateway.intervals["heartbeat"])
    assert abs(gap - other) > 0.5                       # two gateways beat at other seconds
    assert "heartbeat" not in scheduler.step(start + 2.1 + gap - 0.05, set())
    assert "heartbeat" in scheduler.step(start + 2.1 + gap + 0.01, set())
    then = start + 2.1 + gap + 0.01                     # and every interval after that
    assert "heartbeat" not in scheduler.step(then + gateway.intervals["heartbeat"] - 0.05, set())
    assert "heartbeat" in scheduler.step(then + gateway.intervals["heartbeat"] + 0.01, set())
    tasks.huey.storage.flush_queue()


def test_task_retries_wait_a_full_jitter_draw_that_doubles_per_attempt():
    import random
    from mash.tasks.queue import retry_wait
    random.seed(7)                                  # tenacity draws from the module's source
    task = tasks.sync_readings.s()                  # retries=4, retry_delay=5
    assert (task.default_retries, task.default_retry_delay) == (4, 5)
    bounds = {}
    for left, bound in ((4, 5), (3, 10), (2, 20), (1, 40)):
        task.retries = left
        draws = [retry_wait(task) for _ in range(1000)]
        assert 0 <= min(draws) < 0.1 * bound and 0.9 * bound < max(draws) <= bound, (left, draws[:5])
        bounds[left] = sorted(draws)
    # a fleet that failed together spreads over each window instead of retrying at one second
    assert bounds[1][950] - bounds[1][50] > 30
    task.retries = 0
    assert retry_wait(task) is None                 # no retry left: Huey's own rule
