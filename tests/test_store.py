"""The store: schema, identities, the outbox, retention under MAX_DB_MB, two stores in one
process, and a disk that fills up."""
import sqlite3

from mash.alerts import AlertEvent
from mash.models import SCHEMA_VERSION, Store
from mash.reader import Reader
from tests.test_tasks import add_backlog

LINE = {"fruiting": {"temp": 24.5, "humidity": 85.2, "co2": 812},
        "spawning": {"temp": 27.9, "humidity": 74.1, "co2": 3100}}


def test_guide_troubleshooting_query_and_wal(store):
    store.save_sensor_data(dict(LINE))
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM sensor_data WHERE synced = 0").fetchone() == (2,)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert conn.execute("PRAGMA page_size").fetchone() == (1024,)
    assert store.db.execute_sql("PRAGMA synchronous").fetchone() == (2,)     # FULL


def test_two_stores_on_two_files_live_in_one_process(tmp_path):
    a, b = Store(tmp_path / "a.db"), Store(tmp_path / "b.db")
    a.save_sensor_data(dict(LINE))
    a.save_sensor_data(dict(LINE))
    b.save_sensor_data(dict(LINE))
    a.add_command("only-a", "REQUEST_STATUS", {}, "mqtt")
    assert (a.pending_count(), b.pending_count()) == (4, 2)
    assert a.known_command("only-a") and not b.known_command("only-a")
    assert a.uid != b.uid and a.reading_id(1) != b.reading_id(1)
    b.mark_synced([1, 2])
    assert (a.pending_count(), b.pending_count()) == (4, 0)
    a.close(), b.close()


def test_reading_ids_are_stable_and_unique_per_database(store, tmp_path):
    data = dict(LINE)
    row_ids = store.save_sensor_data(data)
    rid = store.reading_id(row_ids[0])
    assert data["reading_ids"] == {"fruiting": rid, "spawning": store.reading_id(row_ids[1])}
    assert rid == Store(store.path).reading_id(row_ids[0])             # same file, same id
    assert Store(tmp_path / "other.db").reading_id(row_ids[0]) != rid  # a new file never collides


def test_firebase_keys_get_a_suffix_within_one_second(store):
    import datetime as dt
    ts = dt.datetime(2026, 1, 28, 10, 0, 0, 100000)
    for i in range(3):
        store.save_sensor_data({"fruiting": {"temp": 24, "humidity": 85, "co2": 800}},
                               timestamp=ts + dt.timedelta(milliseconds=100 * i))
    assert [r.fb_key for r in store.m.SensorData.select()] == [
        "2026-01-28T10-00-00", "2026-01-28T10-00-00-1", "2026-01-28T10-00-00-2"]


def test_an_alert_and_a_command_outcome_are_owed_once_to_each_sink(store):
    store.add_alerts([AlertEvent("high_co2", "CRITICAL", "fruiting", 1600, 1500, "raised", "hi")])
    store.add_command("c1", "set_actuator", {"actuator": "MIST_MAKER", "state": "ON"}, "mqtt")
    assert [o.kind for o in store.owed("backend")] == ["alert"]     # the command is not final yet
    assert store.finish_command("c1", True, desired=("MIST_MAKER", "ON"))
    assert not store.finish_command("c1", False)                     # one final status per id
    for sink in ("backend", "mqtt"):
        owed = store.owed(sink)
        assert [(o.kind, o.ref) for o in owed] == [("alert", "1"), ("ack", "c1")]
        assert owed[0].message["id"] == store.alert_id(1) and owed[1].message["status"] == "completed"
    item = store.owed("mqtt")[0]
    assert store.delivered(item.id) and not store.delivered(item.id)
    stats = store.get_stats()
    assert stats["alerts_pending"] == 1 and stats["commands_unacked"] == 1


def test_backend_progress_marker_replaces_the_pending_index(store):
    add_backlog(store, 10)
    indexes = [r[0] for r in store.db.execute_sql(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'sensor_data'")]
    assert "sensor_data_pending" not in indexes
    store.mark_synced([1, 2, 3, 5])
    assert store.backend_progress() == 3 and store.pending_count() == 16
    store.mark_rejected([4], "refused")
    assert store.backend_progress() == 5
    assert [r.id for r in store.unsynced(3)] == [6, 7, 8]
    assert store.retry_rejected() == 1 and store.backend_progress() == 3
    assert [r.id for r in store.unsynced(2)] == [4, 6]


def test_retention_deletes_the_oldest_synced_readings_and_never_unsynced(store):
    S = store.m.SensorData
    add_backlog(store, 20000)
    store.mark_synced(list(range(1, 30001)))
    used = store.used_bytes()
    state = store.enforce_budget(int(used * 0.6))
    assert state["deleted"] > 0 and not state["over"]
    remaining = [r.id for r in S.select(S.id).order_by(S.id)]
    assert remaining[0] == state["deleted"] + 1                        # oldest first
    assert S.select().where(S.synced == 0).count() == 10000            # all unsynced kept
    assert store.get_stats()["readings_deleted_by_retention"] == state["deleted"]


def test_retention_waits_for_firebase_when_firebase_is_on(store):
    add_backlog(store, 5000)
    store.m.SensorData.update(synced=1).execute()
    store.sink_ok("firebase", progress=1000)
    state = store.enforce_budget(1, firebase_on=True)
    assert state["deleted"] == 1000 and state["over"]


def test_over_budget_with_only_unsynced_data_is_said_loudly(make_settings, caplog):
    reader = Reader(make_settings(MAX_DB_MB="1"))
    A = reader.store.m.Alert
    add_backlog(reader.store, 12000)                                    # > 1 MB, all unsynced
    with caplog.at_level("ERROR"):
        reader.housekeeping.check_budget()
    assert "over MAX_DB_MB=1" in caplog.text and "nothing unsynced is deleted" in caplog.text
    assert reader.store.m.SensorData.select().count() == 24000
    stats = reader.store.get_stats()
    assert stats["storage_over_budget"] is True and stats["storage_used_mb"] > 1
    alert = A.get(A.event_type == "storage_full")
    assert alert.severity == "CRITICAL" and alert.state == "raised"
    reader.housekeeping.check_budget()
    assert A.select().where(A.event_type == "storage_full").count() == 1   # said once


def test_disk_full_while_writing_loses_nothing_and_does_not_crash(make_settings):
    reader = Reader(make_settings())
    db, S = reader.store.db, reader.store.m.SensorData
    line = b'{"fruiting":{"temp":24.0,"humidity":85.0,"co2":%d},"spawning":{"temp":28.0,"humidity":70.0,"co2":900}}'
    for i in range(5):
        reader.handle_line(line % (500 + i))
    pages = db.execute_sql("PRAGMA page_count").fetchone()[0]
    db.execute_sql(f"PRAGMA max_page_count = {pages}")                  # the disk is now full
    try:
        for i in range(5, 400):
            reader.handle_line(line % (500 + i))                         # never raises
        assert reader.store_error and "full" in reader.store_error
        assert len(reader.unstored) > 0
        assert S.select().count() < 800
    finally:
        db.execute_sql("PRAGMA max_page_count = 1073741823")
    reader.housekeeping._last = 0
    reader.chores()
    assert reader.store_error is None and not reader.unstored
    co2 = sorted(r.co2 for r in S.select().where(S.room == "fruiting"))
    assert co2 == list(range(500, 900))                                  # every line once, in order
