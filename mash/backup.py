"""``mash backup [-o FILE]`` and ``mash restore FILE``: a farm in one archive, onto a new card.

The archive (``.tar.gz``, mode 0600: it holds the passwords) has:

- ``mash.db``: a consistent snapshot of the store, taken with SQLite's online backup in one
  step (one read transaction: the reader goes on writing meanwhile, and what it writes after
  the snapshot began is simply not in it);
- ``config/.env`` and ``config/firebase_config.json`` when they exist;
- ``manifest.json``: the gateway version, the store's uid, its schema version, its row counts,
  when it was taken.

``restore`` refuses a store that holds readings unless ``--force`` (and always while the
reader runs), drops the old card's process heartbeats, keeps the archive's uid (so reading ids go on where they stopped, never
colliding with what the cloud has), writes the config files that are missing (``--force``
replaces them), and ends with ``mash doctor``. ``mash backup --every 1d --keep 7 -o DIR`` keeps
rolling backups in DIR (another disk, say).
"""
from __future__ import annotations

import datetime as dt
import io
import json
import os
import re
import sqlite3
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from mash import __version__
from mash.config import Settings, env_file_path

MANIFEST = "manifest.json"
DB = "mash.db"
ENV = "config/.env"
FIREBASE_KEY = "config/firebase_config.json"
PREFIX = "mash-backup-"
COUNTED = ("sensor_data", "alerts", "commands", "outbox")
_EVERY_RE = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class BackupError(Exception):
    """A backup or restore refused, with the reason (nothing changed)."""


def _snapshot(db_path: Path, dest: Path) -> None:
    """SQLite's online backup of ``db_path`` into ``dest``, in one step."""
    src = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    try:
        dst = sqlite3.connect(dest)
        try:
            src.backup(dst)               # pages=-1: all in one read transaction
        finally:
            dst.close()
    finally:
        src.close()


def describe(db_path: Path) -> dict:
    """A store file's uid, schema version and row counts."""
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        row = con.execute("SELECT value FROM meta WHERE key = 'db_uid'").fetchone()
        counts = {}
        for table in COUNTED:
            try:
                counts[table] = con.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
            except sqlite3.Error:
                counts[table] = None
        return {"store_uid": json.loads(row[0]) if row else None,
                "schema": con.execute("PRAGMA user_version").fetchone()[0], "counts": counts}
    finally:
        con.close()


def _private_file(path: Path):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "wb")


def backup(settings: Settings, output: Path | None = None) -> tuple[Path, dict]:
    """Write the archive; returns ``(its path, the manifest)``. ``output`` may be a file or
    a directory (default ``<data>/backups``)."""
    db_path = settings.db_path
    if not db_path.exists():
        raise BackupError(f"no store at {db_path}: nothing to back up")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    if output is None:
        output = settings.data_dir / "backups"
    output = Path(output)
    if output.is_dir() or str(output).endswith("/"):
        output.mkdir(parents=True, exist_ok=True)
        output = output / f"{PREFIX}{stamp}.tar.gz"
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".mash-backup-") as tmp:
        snap = Path(tmp) / DB
        _snapshot(db_path, snap)
        manifest = {"version": __version__, "created": stamp, **describe(snap), "files": [DB]}
        extra = [(ENV, env_file_path()), (FIREBASE_KEY, Path(settings.firebase_credentials))]
        partial = output.with_name(f".{output.name}.part")
        with _private_file(partial) as f, tarfile.open(fileobj=f, mode="w:gz") as tar:
            tar.add(snap, arcname=DB)
            for name, path in extra:
                if path.is_file():
                    tar.add(path, arcname=name)
                    manifest["files"].append(name)
            data = json.dumps(manifest, indent=1).encode()
            info = tarfile.TarInfo(MANIFEST)
            info.size, info.mtime, info.mode = len(data), int(time.time()), 0o600
            tar.addfile(info, io.BytesIO(data))
        os.replace(partial, output)
    return output, manifest


def backup_into(settings: Settings, directory: Path, keep: int, out=sys.stderr) -> Path:
    """A backup into ``directory``, then only the newest ``keep`` of them kept there (what the
    backup timer unit runs, and each round of ``--every``)."""
    directory = Path(directory)
    if not directory.is_dir():       # an unmounted disk must not become a folder on the SD card
        raise BackupError(f"{directory} is not a directory (is its disk mounted?)")
    path, manifest = backup(settings, directory)
    kept = sorted(directory.glob(f"{PREFIX}*.tar.gz"))
    for old in kept[:-keep] if keep > 0 else []:
        old.unlink()
    print(f"backup {path} ({path.stat().st_size} bytes, "
          f"{manifest['counts']['sensor_data']} readings); keeping {min(keep, len(kept))}",
          file=out, flush=True)
    return path


def rolling(settings: Settings, directory: Path, every: str, keep: int,
            out=sys.stderr, rounds: int | None = None) -> int:
    """A backup into ``directory`` every ``every`` (``30m``, ``6h``, ``1d``), keeping the
    newest ``keep``; runs until stopped (``rounds``: that many, for a test)."""
    m = _EVERY_RE.match(every or "")
    if not m or int(m.group(1)) == 0:
        raise BackupError(f"--every {every!r}: a number and s, m, h or d (e.g. 1d)")
    period = int(m.group(1)) * _UNITS[m.group(2)]
    directory = Path(directory)
    done = 0
    while rounds is None or done < rounds:
        backup_into(settings, directory, keep, out)
        done += 1
        if rounds is None or done < rounds:
            time.sleep(period)
    return 0


def read_manifest(archive: Path) -> dict:
    try:
        with tarfile.open(archive, "r:gz") as tar:
            return json.loads(tar.extractfile(MANIFEST).read())
    except (OSError, tarfile.TarError, KeyError, AttributeError, ValueError) as exc:
        raise BackupError(f"{archive} is no mash backup: {exc}") from None


def _store_has_readings(db_path: Path) -> bool:
    if not db_path.exists():
        return False
    try:
        return bool(describe(db_path)["counts"]["sensor_data"])
    except sqlite3.Error:
        return True              # unreadable: treat as something to keep


def _reader_alive(db_path: Path) -> bool:
    if not db_path.exists():
        return False
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        row = con.execute("SELECT value FROM meta WHERE key = 'process.reader'").fetchone()
    except sqlite3.Error:
        return False
    finally:
        con.close()
    if not row:
        return False
    beat = json.loads(row[0])
    if beat.get("stopped"):
        return False
    at = dt.datetime.fromisoformat(beat["at"].rstrip("Z"))
    age = (dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) - at).total_seconds()
    return age < 3 * float(beat.get("every", 60))


def restore(settings: Settings, archive: Path, force: bool = False, out=sys.stderr) -> dict:
    """Put the archive's store (and missing config files) in place; returns its manifest.
    Raises BackupError, changing nothing, when refused."""
    archive = Path(archive)
    manifest = read_manifest(archive)
    db_path = settings.db_path
    if _reader_alive(db_path):
        raise BackupError("the reader is running on this store: stop the services first "
                          "(Ctrl-C `mash run`, or `sudo systemctl stop mash-reader mash-worker "
                          "mash-dashboard`)")
    if _store_has_readings(db_path) and not force:
        raise BackupError(f"{db_path} already holds readings: refused (restore --force "
                          "replaces it)")
    db_path.parent.mkdir(parents=True, exist_ok=True)
    targets = {ENV: env_file_path(), FIREBASE_KEY: Path(settings.firebase_credentials)}
    with tarfile.open(archive, "r:gz") as tar, \
            tempfile.TemporaryDirectory(dir=db_path.parent, prefix=".mash-restore-") as tmp:
        names = set(tar.getnames())
        if DB not in names:
            raise BackupError(f"{archive} has no {DB}")
        tar.extract(DB, tmp, filter="data")
        staged = Path(tmp) / DB
        found = describe(staged)
        if found["store_uid"] != manifest.get("store_uid"):
            raise BackupError(f"{archive}: its store's uid {found['store_uid']} is not the "
                              f"manifest's {manifest.get('store_uid')}")
        con = sqlite3.connect(staged)
        try:
            check = con.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            con.close()
        if check != "ok":
            raise BackupError(f"{archive}: its store fails quick_check ({check})")
        con = sqlite3.connect(staged)
        try:                 # the old card's processes are not this one's
            with con:
                con.execute("DELETE FROM meta WHERE key LIKE 'process.%'")
        finally:
            con.close()
        for suffix in ("-wal", "-shm", ""):
            side = db_path.with_name(db_path.name + suffix)
            if side.exists():
                side.unlink()
        os.chmod(staged, 0o600)
        os.replace(staged, db_path)
        print(f"restored {DB} (uid {found['store_uid']}, {found['counts']['sensor_data']} "
              f"readings) to {db_path}", file=out)
        for name, target in targets.items():
            if name not in names:
                continue
            if target.exists() and not force:
                print(f"kept the existing {target} (restore --force replaces it)", file=out)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            member = tar.extractfile(name)
            with _private_file(target) as f:
                f.write(member.read())
            print(f"restored {target}", file=out)
    return manifest
