"""Schema versions: a file from a newer gateway is refused, an old one is brought forward
with what it owed."""
import sqlite3

import pytest

from mash.models import SCHEMA_VERSION, SchemaTooNew, Store
from mash.models.migrations import migrate


def test_a_newer_schema_is_refused_not_overwritten(store):
    store.db.pragma("user_version", 99)
    with pytest.raises(SchemaTooNew, match="upgrade the gateway"):
        migrate(store.db, store.m)
    store.db.pragma("user_version", SCHEMA_VERSION)


def test_a_version_1_file_is_migrated_with_its_owed_deliveries(tmp_path):
    path = tmp_path / "v1.db"
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE sensor_data (id INTEGER PRIMARY KEY, room TEXT, temperature REAL,
            humidity REAL, co2 INTEGER, timestamp DATETIME, synced INTEGER DEFAULT 0,
            synced_at DATETIME, fb_key TEXT);
        CREATE INDEX sensor_data_pending ON sensor_data (id) WHERE synced = 0;
        CREATE TABLE alerts (id INTEGER PRIMARY KEY, event_type TEXT, severity TEXT, room TEXT,
            value REAL, threshold REAL, message TEXT, state TEXT, created_at DATETIME,
            backend_done_at DATETIME, backend_error TEXT, mqtt_done_at DATETIME);
        CREATE TABLE commands (seq INTEGER PRIMARY KEY, command_id TEXT UNIQUE, command TEXT,
            parameters TEXT, source TEXT, received_at DATETIME, expires_at DATETIME, status TEXT,
            reason TEXT, response TEXT, attempts INTEGER DEFAULT 0, finished_at DATETIME,
            backend_acked_at DATETIME, backend_ack_error TEXT, mqtt_acked_at DATETIME);
        CREATE TABLE actuator_state (actuator TEXT PRIMARY KEY, desired TEXT, updated_at DATETIME);
        CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER DEFAULT 0);
        CREATE TABLE sink_state (name TEXT PRIMARY KEY, online INTEGER DEFAULT 0,
            last_ok DATETIME, last_error TEXT, progress INTEGER DEFAULT 0);
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
        INSERT INTO meta VALUES ('db_uid', '"abcdef012345"');
        INSERT INTO sensor_data (room, temperature, humidity, co2, timestamp, synced, fb_key)
            VALUES ('fruiting', 24, 85, 800, '2026-01-28 10:00:00', 1, 'k1'),
                   ('fruiting', 24, 85, 800, '2026-01-28 10:00:05', 0, 'k2');
        INSERT INTO alerts (event_type, severity, room, message, state, created_at,
            backend_done_at) VALUES ('high_co2', 'CRITICAL', 'fruiting', 'hi', 'raised',
            '2026-01-28 10:00:00.250000', '2026-01-28 10:00:01');
        INSERT INTO commands (command_id, command, parameters, source, received_at, status,
            response, finished_at, mqtt_acked_at) VALUES ('c9', 'set_actuator', '{}', 'mqtt',
            '2026-01-28 10:00:00', 'completed', '{"board":"ok"}', '2026-01-28 10:00:02',
            '2026-01-28 10:00:03');
        PRAGMA user_version = 1;
    """)
    conn.close()
    store = Store(path)
    assert store.db.pragma("user_version") == SCHEMA_VERSION
    assert [(o.kind, o.ref) for o in store.owed("mqtt")] == [("alert", "1")]
    assert [(o.kind, o.ref) for o in store.owed("backend")] == [("ack", "c9")]
    assert store.owed("mqtt")[0].message == {
        "id": "abcdef012345-a1", "room": "fruiting", "type": "high_co2", "severity": "CRITICAL",
        "message": "hi", "value": None, "threshold": None, "timestamp": "2026-01-28T10:00:00.250Z"}
    assert store.backend_progress() == 1 and store.pending_count() == 1
    assert "backend_done_at" not in [c.name for c in store.db.get_columns("alerts")]


def test_two_processes_opening_a_new_file_at_once_both_get_the_current_schema(tmp_path):
    """The reader and the worker start together on a fresh SD card."""
    import subprocess
    import sys
    from tests.services import ROOT
    path = tmp_path / "new.db"
    code = f"from mash.models import Store; Store({str(path)!r}).close()"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=str(ROOT), stderr=subprocess.PIPE)
             for _ in range(4)]
    errors = [p.communicate(timeout=60)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    assert Store(path).db.pragma("user_version") == SCHEMA_VERSION


def test_migrations_a_newer_additive_schema_still_opens_for_a_rollback(store):
    """docs/DESIGN.md, the store across versions: a file a newer release migrated opens with
    this code when that release recorded it compatible down to our schema."""
    from mash.models.migrations import COMPAT_KEY, SCHEMA_VERSION
    newer = SCHEMA_VERSION + 1
    store.db.pragma("user_version", newer)
    store.meta_set(COMPAT_KEY, {"schema": newer, "compatible_from": SCHEMA_VERSION})
    store.close()
    again = Store(store.path)
    assert again.db.pragma("user_version") == newer        # never written down
    assert Store(store.path, readonly=True).uid == again.uid
    again.meta_set(COMPAT_KEY, {"schema": newer, "compatible_from": newer})
    again.close()
    with pytest.raises(SchemaTooNew):
        Store(store.path)
