"""The MASH apps' Firebase layout (CONTRACT §8): firebase-admin against the RTDB stand-in, on a
real store, with the worker's own jobs and loops called directly."""
import datetime as dt
import json
import time
from fractions import Fraction

import pytest

from mash.alerts import AlertEvent
from mash.clock import to_epoch, utcnow
from mash.models import aggregates
from mash.models.rebase import rebase
from mash.tasks import delivery, firebase_apps, sync
from mash.tasks.context import WorkerContext
from mash.tasks.intake import FirebaseCommandQueue
from mash.tasks.live import FirebaseLiveFeed
from tests.services import wait_for

SERIAL = "MASH-B2-CAL26-CE637C"


@pytest.fixture
def apps(make_settings, rtdb):
    made = []

    def make(layout="both", **env):
        settings = make_settings(DEVICE_ID=SERIAL, FIREBASE_LAYOUT=layout,
                                 FIREBASE_DATABASE_URL="https://mash-test.firebaseio.com",
                                 FIREBASE_CREDENTIALS=str(rtdb.credentials), **env)
        ctx = WorkerContext(settings, backend=None, mqtt=None)
        firebase_apps.announce(ctx)
        made.append(ctx)
        return ctx
    yield make
    for ctx in made:
        ctx.firebase.close()
        ctx.store.close()


def line(i):
    return {"fruiting": {"temp": 20 + (i % 37) / 10, "humidity": 80 + (i % 13) / 10, "co2": 700 + i % 91},
            "spawning": {"temp": 27 + (i % 11) / 10, "humidity": 70 + (i % 7) / 10, "co2": 2900 + i % 53}}


def expected_hours(store):
    """Every (room, hour) the store holds, aggregated in Python from the rows themselves (the
    exact decimal mean, rounded half to even)."""
    S = store.m.SensorData
    hours = {}
    for r in S.select().order_by(S.id):
        hours.setdefault((r.room, r.timestamp.strftime("%Y-%m/%d/%H:00")), []).append(r)
    out = {}
    for key, rows in hours.items():
        agg = {"sample_count": len(rows), "first_ts": to_epoch(min(r.timestamp for r in rows)),
               "last_ts": to_epoch(max(r.timestamp for r in rows))}
        for name, field in (("temp", "temperature"), ("hum", "humidity"), ("co2", "co2")):
            values = [getattr(r, field) for r in rows]
            exact_mean = sum(Fraction(str(v)) for v in values) / len(values)
            agg.update({f"avg_{name}": float(round(exact_mean, 2)),
                        f"min_{name}": round(min(values), 2), f"max_{name}": round(max(values), 2)})
        out[key] = agg
    return out


def tree_hours(rtdb):
    out = {}
    for room, months in rtdb.tree.get("historical_aggregates", {}).get(SERIAL, {}).items():
        for month, days in months.items():
            for day, hours in days.items():
                for hour, value in hours.items():
                    out[(room, f"{month}/{day}/{hour}")] = value
    return out


def aggregate_writes(rtdb):
    """(path, value) of every aggregate written, in order."""
    return [(path, value) for method, base, body in rtdb.writes() if method == "PATCH"
            for path, value in body.items() if path.startswith("historical_aggregates/")]


def test_a_week_of_readings_fills_its_hours_exactly_once(apps, rtdb):
    ctx = apps()
    now = utcnow().replace(minute=30, second=0, microsecond=0)
    week_ago = now.replace(minute=0) - dt.timedelta(days=7)
    for i in range(7 * 24 * 6):                        # a line every 10 minutes for a week
        ctx.store.save_sensor_data(line(i), timestamp=week_ago + dt.timedelta(minutes=10 * i))
    for i in range(20):                                # and the current hour, every 5 s
        ctx.store.save_sensor_data(line(i), timestamp=now + dt.timedelta(seconds=5 * i))
    firebase_apps.AGG_BATCH, firebase_apps.PACE = 50, 0.0      # several updates, oldest first
    try:
        assert firebase_apps.backup_aggregates(ctx) == len(expected_hours(ctx.store))
    finally:
        firebase_apps.AGG_BATCH, firebase_apps.PACE = 100, 0.2
    assert tree_hours(rtdb) == expected_hours(ctx.store)
    writes = aggregate_writes(rtdb)
    assert len(writes) == len({p for p, _ in writes}) == 2 * (7 * 24 + 1)     # each hour once
    hours_in_order = [p.split("/", 3)[3] for p, _ in writes]
    assert hours_in_order == sorted(hours_in_order)
    # nothing new: nothing written again
    assert firebase_apps.backup_aggregates(ctx) == 0
    assert not firebase_apps.aggregates_due(ctx)
    # the current hour grows: only it is rewritten, exactly
    ctx.store.save_sensor_data(line(99), timestamp=now + dt.timedelta(seconds=200))
    assert firebase_apps.backup_aggregates(ctx) == 2
    current = now.strftime("%Y-%m/%d/%H:00")
    assert tree_hours(rtdb)[("fruiting", current)] == expected_hours(ctx.store)[("fruiting", current)]
    assert tree_hours(rtdb)[("fruiting", current)]["sample_count"] == 21


def test_late_and_rebased_readings_rewrite_their_hour(apps, rtdb):
    ctx = apps()
    old = utcnow().replace(minute=0, second=0, microsecond=0) - dt.timedelta(days=2)
    for i in range(6):
        ctx.store.save_sensor_data(line(i), timestamp=old + dt.timedelta(minutes=i))
    firebase_apps.backup_aggregates(ctx)
    # held for the clock (stamped by boot time), then rebased into that old hour
    ctx.store.save_sensor_data(line(50), timestamp=utcnow(), provisional=("boot-1", 100.0))
    assert firebase_apps.backup_aggregates(ctx) == 0             # held: not summed yet
    rebase(ctx.store, "boot-1", to_epoch(old) + 30 * 60 - 100.0)
    assert firebase_apps.backup_aggregates(ctx) == 2
    key = ("fruiting", old.strftime("%Y-%m/%d/%H:00"))
    assert tree_hours(rtdb)[key]["sample_count"] == 7
    assert tree_hours(rtdb) == expected_hours(ctx.store)


def test_simulated_board_readings_are_left_out_of_the_aggregates(apps, rtdb):
    ctx = apps()
    ctx.store.save_sensor_data(line(1))
    ctx.store.save_sensor_data(line(2))
    S = ctx.store.m.SensorData
    S.update(simulated=1).where(S.id > 2).execute()
    firebase_apps.backup_aggregates(ctx)
    assert [v["sample_count"] for v in tree_hours(rtdb).values()] == [1, 1]


def test_latest_reading_follows_the_newest_line_and_never_goes_back(apps, rtdb):
    ctx = apps()
    feed = FirebaseLiveFeed(ctx)
    t0 = utcnow().replace(microsecond=0)
    ctx.store.save_sensor_data(line(1), timestamp=t0)
    ctx.store.save_sensor_data(line(2), timestamp=t0 + dt.timedelta(seconds=5))
    assert feed.step() is True
    latest = rtdb.tree["devices"][SERIAL]["latest_reading"]
    ts = to_epoch(t0 + dt.timedelta(seconds=5))
    assert latest == {"timestamp": ts,
                      "fruiting": {"temperature": 20.2, "humidity": 80.2, "co2": 702, "timestamp": ts},
                      "spawning": {"temperature": 27.2, "humidity": 70.2, "co2": 2902, "timestamp": ts}}
    assert rtdb.tree["live_readings"][SERIAL]["spawning"] == {
        "current_temp": 27.2, "current_hum": 70.2, "current_co2": 2902, "last_updated": ts}
    # a reading stamped earlier (a clock that went back) never overwrites the newer one
    ctx.store.save_sensor_data(line(3), timestamp=t0 + dt.timedelta(seconds=1))
    assert feed.step() is False
    assert rtdb.tree["devices"][SERIAL]["latest_reading"]["fruiting"]["co2"] == 702
    assert len([w for w in rtdb.writes() if "devices/%s/latest_reading/timestamp" % SERIAL in (w[2] or {})]) == 1


def test_relay_changes_give_latest_actuators_and_one_log_each(apps, rtdb):
    ctx = apps()
    store = ctx.store
    # a worker starting says every relay as it is, before any switch
    assert delivery.deliver_owed(ctx) == 1
    before = rtdb.tree["devices"][SERIAL]["latest_actuators"]
    assert before["fruiting"]["mist_maker"] is False and "actuator_logs" not in rtdb.tree
    store.add_command("c1", "set_actuator", {"actuator": "MIST_MAKER", "state": "ON"}, "firebase")
    store.finish_command("c1", True, desired=("MIST_MAKER", "ON"))
    store.add_command("auto-1", "set_actuator", {"actuator": "SPAWNING_EXHAUST_FAN", "state": "ON"},
                      "auto", status="completed", response={}, desired=("SPAWNING_EXHAUST_FAN", "ON"))
    # the two relays; the two acks wait, owed to the backend and MQTT, neither configured
    assert delivery.deliver_owed(ctx) == 2
    assert len(store.owed("backend")) == 2 and len(store.owed("mqtt")) == 2
    dev = rtdb.tree["devices"][SERIAL]["latest_actuators"]
    assert dev["fruiting"] == {"mist_maker": True, "humidifier_fan": False, "exhaust_fan": False,
                               "intake_fan": False, "led": False}
    assert dev["spawning"] == {"exhaust_fan": True} and dev["device"] == {"exhaust_fan": False}
    logs = sorted(rtdb.tree["actuator_logs"][SERIAL].values(), key=lambda e: e["timestamp"])
    assert [(e["room"], e["actuator"], e["state"], e["mode"]) for e in logs] == [
        ("fruiting", "mist_maker", "ON", "manual"), ("spawning", "exhaust_fan", "ON", "auto")]
    # a re-send (a crash before it was marked done) overwrites itself
    O = store.m.Outbox
    O.update(done_at=None).where(O.sink == "firebase").execute()
    assert delivery.deliver_owed(ctx) == 3              # the snapshot and the two switches
    assert len(rtdb.tree["actuator_logs"][SERIAL]) == 2
    assert rtdb.tree["devices"][SERIAL]["latest_actuators"] == dev


def test_a_co2_episode_shows_then_clears_with_two_notifications(apps, rtdb):
    ctx = apps()
    raised = AlertEvent("high_co2", "CRITICAL", "fruiting", 4200.0, 2000.0, "raised", "CO2 high in fruiting")
    ctx.store.add_alerts([raised])
    delivery.deliver_owed(ctx)
    alert = rtdb.tree["alerts"][SERIAL]["fruiting_high_co2"]
    assert (alert["id"], alert["alert_type"], alert["severity"], alert["active"],
            alert["is_acknowledged"]) == ("fruiting_high_co2", "high_co2", "CRITICAL", True, False)
    ctx.store.add_alerts([AlertEvent("high_co2", "CRITICAL", "fruiting", 900.0, 2000.0, "cleared",
                                     "CO2 back to normal in fruiting")])
    delivery.deliver_owed(ctx)
    assert SERIAL not in rtdb.tree.get("alerts", {})
    notes = sorted(rtdb.tree["notifications"][SERIAL].values(), key=lambda n: n["id"])
    assert [(n["event_type"], n["active"], n["room"], n["alert_type"], n["device_id"]) for n in notes] == [
        ("alert_raised", True, "fruiting", "high_co2", SERIAL),
        ("alert_resolved", False, "fruiting", "high_co2", SERIAL)]


def test_command_queue_items_go_into_the_ledger_once_and_are_deleted(apps, rtdb):
    ctx = apps()
    queue = rtdb.tree.setdefault("devices", {}).setdefault(SERIAL, {}).setdefault("command_queue", {})
    queue["-Nk1"] = {"actuator": "mist_maker", "room": "fruiting", "state": True,
                     "source": "mobile_app", "timestamp": 1767000000}
    queue["-Nk2"] = {"actuator": "exhaust_fan", "room": "spawning", "state": "off"}
    queue["-Nk3"] = {"actuator": "teleporter", "room": "fruiting", "state": True}
    queue["-Nk4"] = {"command_type": "set_auto_mode", "enabled": False}
    poller = FirebaseCommandQueue(ctx)
    assert poller.step() == {"-Nk1": "queued", "-Nk2": "queued", "-Nk3": "dropped", "-Nk4": "done"}
    assert rtdb._get(["devices", SERIAL, "command_queue"]) is None
    cmd = ctx.store.command("fb--Nk1")
    assert (cmd.source, cmd.command, json.loads(cmd.parameters)) == (
        "firebase", "set_actuator", {"actuator": "MIST_MAKER", "state": "ON"})
    assert json.loads(ctx.store.command("fb--Nk2").parameters)["actuator"] == "SPAWNING_EXHAUST_FAN"
    assert ctx.stats()["mode"] == {"fruiting": "manual", "spawning": "manual"}
    assert ctx.store.counters()["bad_command.firebase_item"] == 1
    # the same push key seen again (a delete that failed, a restarted worker): not run twice
    rtdb._set(["devices", SERIAL, "command_queue", "-Nk1"],
              {"actuator": "mist_maker", "room": "fruiting", "state": True})
    assert FirebaseCommandQueue(ctx).step() == {"-Nk1": "duplicate"}
    assert rtdb._get(["devices", SERIAL, "command_queue"]) is None
    C = ctx.store.m.Command
    assert C.select().where(C.command_id == "fb--Nk1").count() == 1


def _queued(rtdb, key):
    rtdb._set(["devices", SERIAL, "command_queue", key],
              {"actuator": "mist_maker", "room": "fruiting", "state": True})


def test_an_item_added_to_the_command_queue_is_taken_at_once_by_the_stream_not_a_poll(
        apps, rtdb, monkeypatch):
    monkeypatch.setattr(FirebaseCommandQueue, "POLL", 60.0)        # neither look comes soon
    monkeypatch.setattr(FirebaseCommandQueue, "FALLBACK", 60.0)
    ctx = apps()
    _queued(rtdb, "-Ns0")                                          # queued while we were away
    poller = FirebaseCommandQueue(ctx).start()
    try:
        wait_for(lambda: poller.stream is not None and poller.stream.connected, timeout=10,
                 what="the stream open")
        wait_for(lambda: ctx.store.command("fb--Ns0"), timeout=5, what="the first item taken")
        for n, drop in ((1, False), (2, True)):
            if drop:                                  # a network blip: it connects again
                assert rtdb.drop_streams() == 1
                wait_for(lambda: [r[0] for r in rtdb.requests].count("STREAM") == 2
                         and poller.stream.connected, timeout=20, what="the stream back")
            t0 = time.monotonic()
            _queued(rtdb, f"-Ns{n}")
            wait_for(lambda: ctx.store.command(f"fb--Ns{n}"), timeout=10, interval=0.01,
                     what="the item in the ledger")
            took = time.monotonic() - t0
            print(f"command_queue item -> ledger: {took * 1000:.0f} ms (drop={drop})")
            assert took < 10                                       # not the minute's look
        wait_for(lambda: rtdb._get(["devices", SERIAL, "command_queue"]) is None, timeout=5,
                 what="the items deleted")
    finally:
        poller.stop()
    assert [r[0] for r in rtdb.requests].count("STREAM") == 2


def test_without_a_stream_the_command_queue_is_polled(apps, rtdb, monkeypatch):
    monkeypatch.setattr(FirebaseCommandQueue, "POLL", 0.2)
    monkeypatch.setattr(FirebaseCommandQueue, "FALLBACK", 60.0)
    ctx = apps()
    monkeypatch.setattr(ctx.firebase, "stream_queue", lambda on_items: None)
    poller = FirebaseCommandQueue(ctx).start()
    try:
        time.sleep(0.5)
        _queued(rtdb, "-Np1")
        wait_for(lambda: ctx.store.command("fb--Np1"), timeout=10, what="the item polled")
    finally:
        poller.stop()


def status_of(rtdb, device):
    return rtdb.tree["devices"][device]["status"]


@pytest.mark.parametrize("layout", ["guide", "apps"])
def test_each_layout_writes_only_its_own_paths(apps, rtdb, layout):
    from mash.tasks import status
    ctx = apps(layout)
    for i in range(3):
        ctx.store.save_sensor_data(line(i))
    ctx.store.add_command("c1", "set_actuator", {"actuator": "FRUITING_LED", "state": "ON"}, "local")
    ctx.store.finish_command("c1", True, desired=("FRUITING_LED", "ON"))
    ctx.store.add_alerts([AlertEvent("high_temp", "WARNING", "spawning", 33.0, 30.0, "raised", "hot")])
    sync.backup_firebase(ctx)
    firebase_apps.backup_aggregates(ctx)
    FirebaseLiveFeed(ctx).step() if firebase_apps.apps_on(ctx) else None
    delivery.deliver_owed(ctx)
    status.heartbeat(ctx)
    assert not ctx.store.has_undelivered(sinks=("firebase",))   # the others are off: kept owed
    apps_roots = {"live_readings", "historical_aggregates", "actuator_logs", "alerts", "notifications"}
    if layout == "guide":
        assert set(rtdb.tree) == {"sensor_data", "devices"}
        assert set(rtdb.tree["devices"][SERIAL]) == {"status"}
    else:
        assert set(rtdb.tree) == apps_roots | {"devices"}
        assert set(rtdb.tree["devices"][SERIAL]) == {"status", "latest_reading", "latest_actuators"}
    st = status_of(rtdb, SERIAL)                  # §8's status object in every layout
    assert st["status"] == "ONLINE" and st["metadata"]["gateway_version"]
    assert "last_boot" in st["metadata"] and st["last_update"].endswith("Z")


def test_the_guide_layout_owes_the_apps_nothing(apps, rtdb):
    ctx = apps("guide")
    ctx.store.add_alerts([AlertEvent("high_temp", "WARNING", "spawning", 33.0, 30.0, "raised", "hot")])
    O = ctx.store.m.Outbox
    assert O.select().where(O.sink == "firebase").count() == 0


def test_serial_pattern_is_a_warning_only(make_settings):
    from mash.sinks.firebase import serial_warning
    assert serial_warning(SERIAL) is None
    assert "not a MASH serial" in serial_warning("rpi_gateway_001")
    assert serial_warning("MASH-B2-cal26-CE637C")
    assert make_settings(DEVICE_ID="rpi_gateway_001").device_id == "rpi_gateway_001"
    from mash.doctor import Doctor
    doctor = Doctor()
    doctor.settings = make_settings(DEVICE_ID="rpi_gateway_001")
    check = doctor.device_serial()
    assert (check.check, check.ok) == ("device serial", None) and check.detail.startswith("warning:")
    doctor.settings = make_settings(DEVICE_ID=SERIAL)
    assert doctor.device_serial().ok is True


def test_a_mean_on_a_tie_is_exact_whatever_the_chunks(apps, rtdb):
    ctx = apps()
    t0 = utcnow().replace(minute=0, second=0, microsecond=0)
    for i, hum in enumerate((85.41, 85.42, 85.41, 85.42)):
        ctx.store.save_sensor_data({"fruiting": {"temp": 24.1, "humidity": hum, "co2": 801}},
                                   timestamp=t0 + dt.timedelta(seconds=i))
    aggregates.accumulate(ctx.store, chunk=1)          # one reading per transaction
    firebase_apps.backup_aggregates(ctx)
    (value,) = tree_hours(rtdb).values()
    assert value["avg_hum"] == 85.42 and value["avg_temp"] == 24.1 and value["sample_count"] == 4


def test_the_controllers_switches_wait_for_the_sweep_and_an_apps_command_does_not(apps):
    ctx = apps()
    delivery.deliver_owed(ctx)            # the start's snapshot
    ctx.store.add_command("auto-7", "set_actuator", {"actuator": "FRUITING_LED", "state": "ON"},
                          "auto", status="completed", response={}, desired=("FRUITING_LED", "ON"))
    O = ctx.store.m.Outbox                # the acks aside: only the relay item is left
    O.update(done_at=utcnow()).where(O.sink != "firebase").execute()
    assert ctx.store.has_undelivered() and not ctx.store.has_undelivered(urgent_only=True)
    delivery.deliver_owed(ctx)
    ctx.store.add_command("fb-x", "set_actuator", {"actuator": "FRUITING_LED", "state": "OFF"}, "firebase")
    ctx.store.finish_command("fb-x", True, desired=("FRUITING_LED", "OFF"))
    assert ctx.store.has_undelivered(urgent_only=True)
