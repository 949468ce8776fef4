"""Every table bounded: the age-out of delivered outbox rows, final commands and alerts, the
dedupe rule that keeps a command the backend still lists, and owed items dropped (counted)
only when the budget needs the room.

Time is faked only through the timestamps written (the ledger's and the retention's ``now``
parameters), never by patching a clock."""
import datetime as dt
import json
import logging
import re

import pytest

from mash import ids
from mash.alerts import AlertEvent
from mash.clock import iso, utcnow
from mash.models import COMPLETED, retention
from mash.models.retention import ALERT_KEEP, AUTO_COMMAND_KEEP, COMMAND_KEEP, OUTBOX_KEEP
from mash.reader import Reader
from mash.tasks.context import WorkerContext
from mash.tasks.intake import poll_commands
from tests.test_tasks import add_backlog

HOUR = dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)
START = dt.datetime(2026, 1, 1)
PER_HOUR = 136              # the relays' switches an hour with climate control in its band
ACTUATORS = ("MIST_MAKER", "HUMIDIFIER_FAN", "FRUITING_EXHAUST_FAN", "FRUITING_INTAKE_FAN")


class Switches:
    """The climate controller's switches, written fast: the first through the ledger API
    (``add_command`` as the board records one: final, with its ack owed to every sink), the
    rest copies of its rows, byte for byte but for their own id and times, in one
    ``executemany`` per table. ~98,000 switches through peewee would take minutes."""

    def __init__(self, store):
        self.store = store
        self.template = None

    def record(self, times: list[dt.datetime]) -> None:
        store, times = self.store, list(times)
        if self.template is None:
            first = times.pop(0)
            assert store.add_command(ids.auto_command_id(), "set_actuator",
                                     {"actuator": "MIST_MAKER", "state": "ON"}, "auto",
                                     status=COMPLETED, desired=("MIST_MAKER", "ON"), now=first,
                                     response={"actuator": "MIST_MAKER", "state": "ON",
                                               "board": "[CMD] Set MIST_MAKER to ON"})
            cur = store.db.execute_sql("SELECT * FROM commands ORDER BY seq DESC LIMIT 1")
            command = dict(zip([c[0] for c in cur.description], cur.fetchone()))
            cur = store.db.execute_sql("SELECT * FROM outbox WHERE ref = ? ORDER BY id",
                                       (command["command_id"],))
            names = [c[0] for c in cur.description]
            self.template = command, [dict(zip(names, row)) for row in cur.fetchall()]
        if not times:
            return
        command, outbox = self.template
        c_cols = [k for k in command if k != "seq"]
        o_cols = [k for k in outbox[0] if k != "id"]
        old_id, old_ts = command["command_id"], json.loads(outbox[0]["payload"])["timestamp"]
        commands, items = [], []
        for t in times:
            cid, text = ids.auto_command_id(), str(t)      # str(): as peewee stores a time
            commands.append([cid if k == "command_id" else text if k in ("received_at",
                             "finished_at") else command[k] for k in c_cols])
            stamp = iso(t)
            for row in outbox:
                body = row["payload"].replace(old_id, cid).replace(old_ts, stamp)
                items.append([cid if k == "ref" else body if k == "payload" else
                              text if k == "created_at" else row[k] for k in o_cols])
        with store.transaction():
            conn = store.db.connection()
            conn.executemany(f"INSERT INTO commands ({', '.join(c_cols)}) VALUES "
                             f"({', '.join('?' * len(c_cols))})", commands)
            conn.executemany(f"INSERT INTO outbox ({', '.join(o_cols)}) VALUES "
                             f"({', '.join('?' * len(o_cols))})", items)


def deliver(store, now: dt.datetime, sinks=("backend", "mqtt")) -> int:
    """The worker's sweep: everything owed to ``sinks`` confirmed at ``now`` (the backend
    refuses the controller's own acks for good: done, with the error)."""
    done = 0
    for sink in sinks:
        owed = [i for (i,) in store.db.execute_sql(
            "SELECT id FROM outbox WHERE sink = ? AND done_at IS NULL", (sink,)).fetchall()]
        if owed:
            done += store.delivered_many(owed, "404 unknown command" if sink == "backend" else None,
                                         now=now)
    return done


def counts(store) -> dict[str, int]:
    return {t: store.db.execute_sql(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
            for t in ("sensor_data", "alerts", "commands", "outbox", "actuator_state",
                      "counters", "sink_state", "meta")}


def owed_acks(store, sink="mqtt") -> int:
    return len([o for o in store.owed(sink, limit=10**6) if o.kind == "ack"])


def alert(event_type: str, state: str, room: str = "fruiting") -> AlertEvent:
    return AlertEvent(event_type, "WARNING", room, 1.0, 2.0, state, f"{event_type} {state}")


def test_a_month_of_climate_control_switches_keeps_the_store_flat(store):
    """30 days at 136 switches an hour, every ack delivered within the hour, a condition
    raised and cleared every six hours, one that stays on: the store after day 7 and after
    day 30 holds the same rows and uses the same pages."""
    switches, step = Switches(store), HOUR / PER_HOUR
    conditions = ("high_temp", "low_humidity", "elevated_co2")
    store.add_alerts([alert("sensor_stale", "raised", "spawning")], now=START)   # never cleared
    alert_times = [START]
    seen = {}
    for hour in range(30 * 24):
        t0 = START + hour * HOUR
        switches.record(t0 + i * step for i in range(PER_HOUR))
        if hour % 6 == 2:
            store.add_alerts([alert(conditions[hour // 6 % 3], "raised")], now=t0 + 10 * step)
            alert_times.append(t0 + 10 * step)
        if hour % 6 == 3:
            store.add_alerts([alert(conditions[hour // 6 % 3], "cleared")], now=t0 + 10 * step)
            alert_times.append(t0 + 10 * step)
        deliver(store, t0 + HOUR - dt.timedelta(seconds=1))
        end = t0 + HOUR
        store.age_out(now=end)                        # the reader's hourly age-out
        if end in (START + 7 * DAY, START + 30 * DAY):
            seen[end] = (store.used_bytes(), counts(store), store.active_alert_keys())
    # What the rules leave after an age-out at `end` (identical for day 7 and day 30):
    # commands finished since end - AUTO_COMMAND_KEEP: 24 hours of switches; each with its
    # two acks, delivered a second before each hour's end, kept OUTBOX_KEEP after delivery;
    # alerts made since end - ALERT_KEEP, plus the one condition still on.
    for end, (_, rows, active) in seen.items():
        kept_alerts = [t for t in alert_times[1:] if end - ALERT_KEEP <= t < end]
        assert AUTO_COMMAND_KEEP == OUTBOX_KEEP == DAY and ALERT_KEEP == 7 * DAY
        assert rows == {"sensor_data": 0, "alerts": len(kept_alerts) + 1,
                        "commands": 24 * PER_HOUR, "outbox": 2 * (24 * PER_HOUR + len(
                            [t for t in kept_alerts if t >= end - DAY])),
                        # meta: the uid and the schema's compatible-versions record
                        "actuator_state": 1, "counters": 0, "sink_state": 0, "meta": 2}, end
        assert active == {("spawning", "sensor_stale")}
    (week, week_rows, _), (month, month_rows, _) = seen.values()
    assert week_rows == month_rows
    # Same rows, same bytes per row (ids and timestamps are fixed-width), so the tables and
    # the indexes in sequence order (commands_status, the rowid trees) hold the same pages,
    # within one part-filled page at each end of each tree (~8 trees). The unique index on
    # the random command ids is filled wherever the ids fall and emptied wherever the old
    # ones were: its pages sit anywhere between full and the third-full at which SQLite
    # merges them, and its fill settles over the first weeks (measured: +12 KiB from day 7
    # to day 30, within 6 KiB from day 14 on). Allowed: 32 pages (32 KiB) of ~3.3 MB, 1 %;
    # a store that kept its history would be 30/7 times the day-7 size.
    assert abs(month - week) <= 32 * 1024, (week, month)
    assert week < 5 * 2**20


def test_a_command_the_backend_still_lists_is_never_run_again_after_age_out(make_settings,
                                                                            devserver):
    """Two backend commands run and finished. The backend never heard the first one's ack
    (refused, or dropped for room), so its history still lists it as sent; the second was
    acked. Long after COMMAND_KEEP, the first stays in the ledger and the poll does not queue
    it again; the second ages out, and the backend's history (completed) never brings it
    back. Once the backend stops listing the first, it ages out too."""
    ctx = WorkerContext(make_settings(**devserver.env()))
    store, device = ctx.store, ctx.settings.device_id
    try:
        unheard = devserver.issue(device, "set_actuator", {"actuator": "MIST_MAKER", "state": "ON"},
                                  id="cmd-unheard")["id"]
        acked = devserver.issue(device, "set_actuator", {"actuator": "FRUITING_LED", "state": "ON"},
                                id="cmd-acked")["id"]
        assert poll_commands(ctx) == 2
        for command_id in (unheard, acked):                  # what the reader does
            store.start_command(command_id)
            assert store.finish_command(command_id, True, response={"board": "[CMD] ok"})
        Switches(store).record([utcnow()])                   # newer: the ledger's newest row
        owed = {(o.ref, o.sink): o.id for sink in ("backend", "mqtt") for o in store.owed(sink)}
        store.delivered_each([(owed[(unheard, "backend")], "refused"),
                              (owed[(unheard, "mqtt")], None), (owed[(acked, "mqtt")], None)])
        ctx.backend.ack_command(acked, "completed", {"board": "[CMD] ok"})
        store.delivered(owed[(acked, "backend")])
        assert poll_commands(ctx) == 0
        assert store.backend_listed() == {unheard}           # still "sent" at the backend

        later = utcnow() + COMMAND_KEEP + DAY
        assert store.age_out(now=later)["commands"] == 1
        assert store.known_command(unheard) and not store.known_command(acked)
        assert poll_commands(ctx) == 0                       # neither is run again
        assert not store.known_command(acked)
        assert store.counters().get("command.duplicate") == 2   # the unheard one, twice

        ctx.backend.ack_command(unheard, "completed", {"board": "[CMD] ok"})  # heard at last
        assert poll_commands(ctx) == 0 and store.backend_listed() == set()
        assert store.age_out(now=later)["commands"] == 1
        assert not store.known_command(unheard)
        assert poll_commands(ctx) == 0
    finally:
        ctx.close()


def test_a_final_command_stays_while_its_ack_is_owed(store):
    store.add_command("mqtt-1", "set_actuator", {"actuator": "MIST_MAKER", "state": "OFF"},
                      "mqtt", status=COMPLETED, response={}, now=START)
    deliver(store, START + HOUR, sinks=("mqtt",))            # the backend has not heard it
    Switches(store).record([START + 2 * HOUR])              # newer: the ledger's newest row
    later = START + COMMAND_KEEP + DAY
    assert store.age_out(now=later) == {"outbox": 1, "commands": 0, "alerts": 0}
    assert store.known_command("mqtt-1")
    deliver(store, later)
    # the outbox's newest row (the switch's MQTT ack) stays: ids are never reused
    assert store.age_out(now=later + OUTBOX_KEEP + HOUR) == {"outbox": 2, "commands": 1,
                                                             "alerts": 0}
    assert not store.known_command("mqtt-1") and store.m.Command.select().count() == 1


def test_an_active_conditions_alert_survives_and_cleared_ones_age_out(store):
    """Old alerts go; a condition still on keeps its row (the reader rebuilds the active
    conditions from each condition's latest row), and an alert a sink is still owed stays."""
    store.add_alerts([alert("high_temp", "raised")], now=START)                  # on for ever
    store.add_alerts([alert("low_humidity", "raised")], now=START + HOUR)
    store.add_alerts([alert("low_humidity", "cleared")], now=START + 2 * HOUR)
    store.add_alerts([alert("low_humidity", "raised")], now=START + 3 * HOUR)
    store.add_alerts([alert("low_humidity", "cleared")], now=START + 4 * HOUR)
    deliver(store, START + 5 * HOUR)
    store.add_alerts([alert("high_co2", "raised", "spawning")], now=START + 6 * HOUR)
    store.add_alerts([alert("high_co2", "cleared", "spawning")], now=START + 7 * HOUR)
    deliver(store, START + 8 * HOUR, sinks=("backend",))     # MQTT still owed these two
    A = store.m.Alert
    aged = store.age_out(now=START + ALERT_KEEP + DAY)
    assert aged["alerts"] == 3                                # low_humidity's older three
    assert [(a.event_type, a.state) for a in A.select().order_by(A.id)] == [
        ("high_temp", "raised"), ("low_humidity", "cleared"),
        ("high_co2", "raised"), ("high_co2", "cleared")]
    assert store.active_alert_keys() == {("fruiting", "high_temp")}
    deliver(store, START + 9 * DAY)
    store.age_out(now=START + 30 * DAY)
    assert [(a.event_type, a.state) for a in A.select().order_by(A.id)] == [
        ("high_temp", "raised"), ("low_humidity", "cleared"), ("high_co2", "cleared")]
    assert store.active_alert_keys() == {("fruiting", "high_temp")}


def test_owed_items_are_kept_until_the_budget_needs_room_then_dropped_counted(make_settings,
                                                                            caplog):
    """MQTT unreachable for weeks: what it is owed piles up and stays while the store has
    room. When the budget needs the room, the items owed for over OWED_STALE go first, the
    oldest first, counted and logged once; then synced readings; items owed for less, and
    unsynced readings, never."""
    reader = Reader(make_settings(MAX_DB_MB="1"))
    store, now = reader.store, utcnow()
    switches = Switches(store)
    old = [now - 20 * DAY + i * HOUR / PER_HOUR for i in range(4 * PER_HOUR)]    # stale
    young = [now - 2 * DAY + i * HOUR / PER_HOUR for i in range(PER_HOUR)]
    switches.record(old)
    switches.record(young)
    deliver(store, now - 2 * DAY, sinks=("backend",))
    assert store.age_out(now=now)["outbox"] == len(old) + len(young)
    assert len(store.owed("mqtt", limit=10**6)) == len(old) + len(young)
    roomy = store.enforce_budget(100 * 2**20, now=now)
    assert roomy["dropped"] == {} and len(store.owed("mqtt", limit=10**6)) == len(old) + len(young)

    add_backlog(store, 3000, start=now - 3 * DAY)             # 6000 readings ...
    store.mark_synced(list(range(1, 4001)))                   # ... 4000 of them synced
    state = store.enforce_budget(store.used_bytes() - 1, now=now)     # one page short
    assert state["dropped"] == {"mqtt": retention.CHUNK}      # one chunk of the oldest did
    assert state["deleted"] == 0 and not state["over"]        # readings untouched
    assert [o.message["timestamp"] for o in store.owed("mqtt", limit=1)] == [
        iso(old[retention.CHUNK])]

    add_backlog(store, 6000, start=now - DAY)                  # 12000 unsynced: over 1 MB
    with caplog.at_level(logging.WARNING, logger="mash.reader"):
        reader.housekeeping.check_budget(now=now)             # the rest of the stale ones
        assert owed_acks(store) == len(young)                  # owed 2 days: kept
        reader.housekeeping.check_budget(now=now + 6 * DAY)   # owed 8 days now: they go too
    assert owed_acks(store) == 0
    assert store.counters()["outbox_dropped.mqtt"] == len(old) + len(young)
    assert store.get_stats()["owed_dropped_by_retention"] == len(old) + len(young)
    drops = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(drops) == 1 and f"dropped {len(old) - retention.CHUNK} items owed to mqtt" in drops[0]
    S = store.m.SensorData
    assert S.select().where(S.synced == 0).count() == 2000 + 12000      # unsynced: all kept
    assert S.select().where(S.synced == 1).count() == 0                 # synced: gone for room
    assert store.get_stats()["storage_over_budget"] is True


def test_storage_full_clears_once_the_age_out_brings_the_store_under_budget(make_settings):
    """Over the budget with nothing retention may delete yet (a day of delivered switches,
    all inside their keep): the alarm is raised; once they have aged out it clears."""
    reader = Reader(make_settings(MAX_DB_MB="1"))
    store, now = reader.store, utcnow()
    A = store.m.Alert
    Switches(store).record(now - HOUR + i * HOUR / 3000 for i in range(3000))
    deliver(store, now)
    assert store.used_bytes() > 2**20
    reader.housekeeping.check_budget()
    assert A.get(A.event_type == "storage_full").state == "raised"
    reader.housekeeping.check_budget(now=now + AUTO_COMMAND_KEEP + HOUR)
    assert [a.state for a in A.select().where(A.event_type == "storage_full")] == [
        "raised", "cleared"]
    assert store.get_stats()["storage_over_budget"] is False
    assert store.m.Command.select().count() == 1               # the newest row stays


@pytest.mark.parametrize("urgent", [False, True])
def test_owed_checks_read_an_index_only(store, urgent):
    """The scheduler asks "anything owed?" every tick: an index, never the outbox table."""
    sql = "SELECT 1 FROM outbox WHERE done_at IS NULL" + (
        " AND substr(ref, 1, 5) <> 'auto-'" if urgent else "") + " LIMIT 1"
    plan = " ".join(r[-1] for r in store.db.execute_sql("EXPLAIN QUERY PLAN " + sql))
    index = "outbox_urgent" if urgent else "outbox_owed"
    assert re.fullmatch(rf"(SCAN|SEARCH) outbox USING (COVERING )?INDEX {index}", plan), plan
    Switches(store).record([START, START + HOUR])
    assert store.has_undelivered() and not store.has_undelivered(urgent_only=True)
    store.add_alerts([alert("high_temp", "raised")], now=START)
    assert store.has_undelivered(urgent_only=True)
    assert store.has_undelivered(urgent_only=True, sinks=["mqtt"])
    assert not store.has_undelivered(sinks=[])
