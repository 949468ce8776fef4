"""``mash backup`` while the reader writes, ``mash restore`` onto a fresh install: the same
store uid, the same rows, the config files, mode 0600, and ``mash doctor`` passing."""
import json
import os
import sqlite3
import stat
import subprocess
import sys
import tarfile

from tests.services import free_port, stop_process, wait_for


def rows(db):
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return con.execute("SELECT id, room, timestamp, temperature FROM sensor_data "
                           "ORDER BY id").fetchall()
    finally:
        con.close()


def count(db):
    try:
        return len(rows(db)) if db.exists() else 0
    except sqlite3.Error:           # made, not yet migrated
        return 0


def uid(db):
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return json.loads(con.execute("SELECT value FROM meta WHERE key='db_uid'").fetchone()[0])
    finally:
        con.close()


def farm_env(root, **extra):
    (root / "config").mkdir(parents=True, exist_ok=True)
    return {**os.environ, "MASH_HOME": str(root), "MASH_DATA_DIR": str(root / "data"),
            "MASH_ENV_FILE": str(root / "config" / ".env"), "SERIAL_PORT": "sim",
            "MASH_QUEUE_DIR": str(root / "queue"), "DASHBOARD_PORT": str(free_port()),
            "FIREBASE_CREDENTIALS": str(root / "config" / "firebase_config.json"), **extra}


def mash(env, *args, timeout=120):
    return subprocess.run([sys.executable, "-m", "mash", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def run(env, log):
    return subprocess.Popen([sys.executable, "-m", "mash", "run", "--interval", "0.1"], env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def test_backup_while_the_reader_writes_restores_onto_a_fresh_install(tmp_path):
    old, new = tmp_path / "old-card", tmp_path / "new-card"
    env = farm_env(old)
    (old / "config" / ".env").write_text("DEVICE_NAME=Grow room 2\n")
    (old / "config" / "firebase_config.json").write_text('{"type": "service_account"}')
    for f in ("config/.env", "config/firebase_config.json"):
        os.chmod(old / f, 0o600)
    db = old / "data" / "mash.db"
    with open(tmp_path / "old.log", "wb") as log:
        proc = run(env, log)
        try:
            wait_for(lambda: count(db) >= 20, timeout=60, what="readings")
            archive = tmp_path / "farm.tar.gz"
            done = mash(env, "backup", "-o", str(archive))
            assert done.returncode == 0, done.stderr
            n = len(rows(db))
            wait_for(lambda: len(rows(db)) > n + 5, timeout=30, what="the reader goes on")
        finally:
            stop_process(proc, timeout=30)
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    with tarfile.open(archive) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())
        assert {"mash.db", "config/.env", "config/firebase_config.json"} <= set(tar.getnames())
    assert manifest["store_uid"] == uid(db) and manifest["version"]
    assert manifest["schema"] >= 6
    saved = manifest["counts"]["sensor_data"]
    assert 20 <= saved < len(rows(db))

    env2 = farm_env(new)
    done = mash(env2, "restore", str(archive))
    assert done.returncode == 0, done.stderr
    assert "✓ store integrity" in done.stdout and "✓ store schema" in done.stdout
    db2 = new / "data" / "mash.db"
    assert uid(db2) == uid(db)
    assert rows(db2) == rows(db)[:saved]                      # the same rows, as they were
    assert (new / "config" / ".env").read_text() == "DEVICE_NAME=Grow room 2\n"
    assert stat.S_IMODE((new / "config" / "firebase_config.json").stat().st_mode) == 0o600
    # a store with readings is not overwritten unless asked
    again = mash(env2, "restore", str(archive))
    assert again.returncode == 1 and "already holds readings" in again.stderr
    # the restored farm runs: doctor passes once its services are up
    with open(tmp_path / "new.log", "wb") as log:
        proc = run(env2, log)
        try:
            wait_for(lambda: len(rows(db2)) > saved + 3, timeout=60, what="readings on the new card")
            doctor = mash(env2, "doctor")
            assert doctor.returncode == 0, doctor.stdout
        finally:
            stop_process(proc, timeout=30)
    assert uid(db2) == manifest["store_uid"]


def test_backup_every_keeps_the_newest(tmp_path, make_settings, store):
    from mash import backup
    store.save_sensor_data({"fruiting": {"temp": 24.0, "humidity": 88.0, "co2": 800}})
    out = tmp_path / "other-disk"
    out.mkdir()
    (out / "mash-backup-20000101T000000Z.tar.gz").write_bytes(b"old")
    backup.rolling(make_settings(), out, "1s", keep=2, rounds=2)
    kept = sorted(p.name for p in out.iterdir())
    assert len(kept) == 2 and "mash-backup-20000101T000000Z.tar.gz" not in kept
    assert all(stat.S_IMODE((out / k).stat().st_mode) == 0o600 for k in kept)
    assert backup.read_manifest(out / kept[-1])["counts"]["sensor_data"] >= 1


def test_backup_into_a_missing_directory_is_refused(tmp_path, make_settings, store):
    from mash import backup
    import pytest
    with pytest.raises(backup.BackupError, match="mounted"):
        backup.backup_into(make_settings(), tmp_path / "unmounted" / "mash", keep=7)
    assert not (tmp_path / "unmounted").exists()
