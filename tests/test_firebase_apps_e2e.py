"""The MASH apps' Firebase layout end to end: the simulated board on a pty, reader.py and
worker.py as real processes, firebase-admin against the RTDB stand-in."""
import datetime as dt

from mash import ids
from mash.clock import utcnow
from mash.models import Store
from tests.services import Gateway, stop_process, wait_for, whole_stack
from tests.test_firebase_apps import SERIAL, expected_hours, tree_hours

MIST_ON = b'{"actuator":"MIST_MAKER","state":"ON"}'


def seed_last_week(path, lines_per_hour=60):
    """A store that already holds last week (a line a minute), written in one transaction."""
    store = Store(path)
    start = utcnow().replace(minute=0, second=0, microsecond=0) - dt.timedelta(days=7)
    rows = []
    for i in range(7 * 24 * lines_per_hour):
        ts = start + dt.timedelta(seconds=i * 3600 / lines_per_hour)
        for room, (t, h, c) in (("fruiting", (22 + i % 30 / 10, 85 + i % 9 / 10, 700 + i % 97)),
                                ("spawning", (27 + i % 20 / 10, 72 + i % 5 / 10, 3000 + i % 89))):
            rows.append(dict(room=room, temperature=t, humidity=h, co2=c, timestamp=ts,
                             fb_key=ids.firebase_key(ts)))
    with store.transaction():
        for n in range(0, len(rows), 5000):
            store.m.SensorData.insert_many(rows[n:n + 5000]).execute()
    return store


def written_twice_differently(rtdb):
    seen, bad = {}, []
    for method, _, body in rtdb.writes():
        for path, value in (body or {}).items() if method == "PATCH" else ():
            if path.startswith("historical_aggregates/"):
                if path in seen and seen[path] != value:
                    bad.append(path)
                seen[path] = value
    return bad, seen


def test_apps_see_the_gateway_and_their_commands_move_the_relays(tmp_path):
    base = tmp_path
    (base / "gw" / "data").mkdir(parents=True)
    store = seed_last_week(base / "gw" / "data" / "mash.db")
    seeded_hours = 2 * 7 * 24
    with whole_stack(base, interval=0.5, DEVICE_ID=SERIAL) as gw:
        rtdb, board = gw.rtdb, gw.board
        observer = gw.broker.observer()
        current = utcnow().strftime("%Y-%m/%d/%H:00")
        finished = lambda: [p for p in written_twice_differently(rtdb)[1] if current not in p]  # noqa: E731
        # the backfill, killed twice mid-way: every finished hour is written with one content
        kills = 0
        for _ in range(2):
            before = len(finished())
            wait_for(lambda: len(finished()) > before, timeout=30, what="backfill progress")
            if len(finished()) >= seeded_hours:
                break
            Gateway.kill(gw.worker)
            kills += 1
            gw.start_worker()
        assert kills >= 1, "the backfill ended before the worker could be killed mid-way"
        wait_for(lambda: len(finished()) >= seeded_hours, timeout=60, what="backfill done")
        assert written_twice_differently(rtdb)[0] == []

        # live values follow the line; the current hour is exact
        wait_for(lambda: store.m.SensorData.select().count() >= 2 * (7 * 24 * 60) + 20, timeout=30,
                 what="live readings")
        S = store.m.SensorData
        last = list(S.select().order_by(S.id.desc()).limit(2))
        wait_for(lambda: (rtdb._get(["devices", SERIAL, "latest_reading", last[0].room]) or {})
                 .get("timestamp") is not None, timeout=5, what="latest_reading")
        board.paused = True
        wait_for(lambda:
                 (lambda rows: all((rtdb._get(["devices", SERIAL, "latest_reading", r.room]) or {}) ==
                                   {"temperature": r.temperature, "humidity": r.humidity, "co2": r.co2,
                                    "timestamp": r.timestamp.replace(tzinfo=dt.timezone.utc).timestamp()}
                                   for r in rows))(list(S.select().order_by(S.id.desc()).limit(2))),
                 timeout=5, what="latest_reading equal to the last line")
        try:
            wait_for(lambda: tree_hours(rtdb) == expected_hours(store), timeout=15,
                     what="every hour exact")
        except AssertionError:
            got, want = tree_hours(rtdb), expected_hours(store)
            diff = {k: (got.get(k), want.get(k)) for k in set(got) | set(want) if got.get(k) != want.get(k)}
            raise AssertionError(f"hours differ: {len(diff)} {list(diff.items())[:3]}") from None

        # a command pressed in the app: the relay moves, the item goes, the outcome shows
        rtdb._set(["devices", SERIAL, "command_queue", "-Nq1"],
                  {"actuator": "mist_maker", "room": "fruiting", "state": True, "source": "mobile_app"})
        wait_for(lambda: board.actuators["MIST_MAKER"] == "ON", timeout=15, what="relay switched")
        wait_for(lambda: rtdb._get(["devices", SERIAL, "command_queue"]) is None, timeout=5,
                 what="item deleted")
        wait_for(lambda: rtdb._get(["devices", SERIAL, "latest_actuators", "fruiting", "mist_maker"]) is True,
                 timeout=15, what="latest_actuators")
        logs = list((rtdb._get(["actuator_logs", SERIAL]) or {}).values())
        assert [(e["actuator"], e["state"], e["mode"]) for e in logs] == [("mist_maker", "ON", "manual")]
        wait_for(lambda: [a for a in observer.on(f"{SERIAL}/command_ack") if a["id"] == "fb--Nq1"],
                 timeout=15, what="MQTT ack")
        # the same push key again, seen by a worker killed and restarted: not run twice
        Gateway.kill(gw.worker)
        rtdb._set(["devices", SERIAL, "command_queue", "-Nq1"],
                  {"actuator": "mist_maker", "room": "fruiting", "state": True})
        gw.start_worker()
        wait_for(lambda: rtdb._get(["devices", SERIAL, "command_queue"]) is None, timeout=30,
                 what="repeated item deleted")
        assert board.received.count(MIST_ON) == 1
        C = store.m.Command
        assert C.select().where(C.command_id == "fb--Nq1").count() == 1
        # a CO2 episode read by the reader: the alert shows while it lasts, two notifications
        board.paused = False
        board.set_values("fruiting", co2=3000)
        alert = ["alerts", SERIAL, "fruiting_high_co2"]
        wait_for(lambda: rtdb._get(alert), timeout=20, what="the alert in Firebase")
        assert rtdb._get(alert)["severity"] == "CRITICAL" and rtdb._get(alert)["active"] is True
        board.set_values("fruiting", co2=600)
        wait_for(lambda: rtdb._get(alert) is None, timeout=20, what="the alert cleared")
        notes = [n for n in (rtdb._get(["notifications", SERIAL]) or {}).values()
                 if n["alert_type"] == "high_co2"]
        assert sorted(n["event_type"] for n in notes) == ["alert_raised", "alert_resolved"]
        wait_for(lambda: rtdb._get(["devices", SERIAL, "status", "status"]) == "ONLINE", timeout=10,
                 what="status ONLINE")
        observer.close()
        stop_process(gw.worker, timeout=20)               # a clean stop says OFFLINE
        assert rtdb._get(["devices", SERIAL, "status", "status"]) == "OFFLINE"
    store.close()
