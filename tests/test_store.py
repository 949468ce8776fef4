"""The store: schema, identities, retention under MAX_DB_MB, and a disk that fills up."""
import sqlite3

import pytest

from mash.models import Alert, SensorData, db
from mash.models.migrations import SchemaTooNew, migrate
from tests.test_tasks import add_backlog


def test_guide_troubleshooting_query_and_wal(store):
    store.save_sensor_data({"fruiting": {"temp": 24.5, "humidity": 85.2, "co2": 812},
                            "spawning": {"temp": 27.9, "humidity": 74.1, "co2": 3100}})
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM sensor_data WHERE synced = 0").fetchone() == (2,)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("PRAGMA user_version").fetchone() == (1,)
    assert db.execute_sql("PRAGMA synchronous").fetchone() == (2,)     # FULL


def test_reading_ids_are_stable_and_unique_per_database(store, tmp_path):
    from mash.models import DatabaseManager
    ids = store.save_sensor_data({"fruiting": {"temp": 24.5, "humidity": 85.2, "co2": 812}})
    rid = store.reading_id(ids[0])
    assert rid == DatabaseManager(store.path).reading_id(ids[0])        # same file, same id
    other = DatabaseManager(tmp_path / "other.db")
    assert other.reading_id(ids[0]) != rid                              # a new file never collides
    DatabaseManager(store.path)


def test_a_newer_schema_is_refused_not_overwritten(store):
    db.pragma("user_version", 99)
    with pytest.raises(SchemaTooNew, match="upgrade the gateway"):
        from mash.models import MODELS
        migrate(db, MODELS)
    db.pragma("user_version", 1)


def test_firebase_keys_get_a_suffix_within_one_second(store):
    import datetime as dt
    ts = dt.datetime(2026, 1, 28, 10, 0, 0, 100000)
    for i in range(3):
        store.save_sensor_data({"fruiting": {"temp": 24, "humidity": 85, "co2": 800}},
                               timestamp=ts + dt.timedelta(milliseconds=100 * i))
    assert [r.fb_key for r in SensorData.select()] == [
        "2026-01-28T10-00-00", "2026-01-28T10-00-00-1", "2026-01-28T10-00-00-2"]


def test_retention_deletes_the_oldest_synced_readings_and_never_unsynced(store):
    add_backlog(store, 20000)
    SensorData.update(synced=1).where(SensorData.id <= 30000).execute()
    used = store.used_bytes()
    state = store.enforce_budget(int(used * 0.6))
    assert state["deleted"] > 0 and not state["over"]
    remaining = [r.id for r in SensorData.select(SensorData.id).order_by(SensorData.id)]
    assert remaining[0] == state["deleted"] + 1                        # oldest first
    assert SensorData.select().where(SensorData.synced == 0).count() == 10000   # all unsynced kept
    assert store.get_stats()["readings_deleted_by_retention"] == state["deleted"]


def test_retention_waits_for_firebase_when_firebase_is_on(store):
    add_backlog(store, 5000)
    SensorData.update(synced=1).execute()
    store.sink_ok("firebase", progress=1000)
    state = store.enforce_budget(1, firebase_on=True)
    assert state["deleted"] == 1000 and state["over"]


def test_over_budget_with_only_unsynced_data_is_said_loudly(make_settings, caplog):
    from mash.reader import Reader
    reader = Reader(make_settings(MAX_DB_MB="1"), notify=lambda k: None)
    add_backlog(reader.store, 12000)                                    # > 1 MB, all unsynced
    with caplog.at_level("ERROR"):
        reader._check_budget()
    assert "over MAX_DB_MB=1" in caplog.text and "nothing unsynced is deleted" in caplog.text
    assert SensorData.select().count() == 24000
    stats = reader.store.get_stats()
    assert stats["storage_over_budget"] is True and stats["storage_used_mb"] > 1
    alert = Alert.get(Alert.event_type == "storage_full")
    assert alert.severity == "CRITICAL" and alert.state == "raised"
    reader._check_budget()
    assert Alert.select().where(Alert.event_type == "storage_full").count() == 1   # said once


def test_disk_full_while_writing_loses_nothing_and_does_not_crash(make_settings):
    from mash.reader import Reader
    reader = Reader(make_settings(), notify=lambda k: None)
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
        committed = SensorData.select().count()
        assert committed < 800
    finally:
        db.execute_sql("PRAGMA max_page_count = 1073741823")
    reader._last_housekeeping = 0
    reader.housekeeping()
    assert reader.store_error is None and not reader.unstored
    co2 = sorted(r.co2 for r in SensorData.select().where(SensorData.room == "fruiting"))
    assert co2 == list(range(500, 900))                                  # every line once, in order
