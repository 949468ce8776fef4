"""Schema versions, kept in SQLite's ``PRAGMA user_version``.

A new database gets the current models and the current version at once. An existing one is
brought forward one step at a time; each step is a function of ``(db, migrator)`` using
``playhouse.migrate`` (add_column, add_index, ...), run in one transaction with the version
bump, so a power cut mid-upgrade leaves the old version intact. To change the schema: edit the
model, add ``STEPS[n+1]`` doing the same change to an old file, bump ``SCHEMA_VERSION``.
"""
from __future__ import annotations

import logging

from playhouse.migrate import SqliteMigrator

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

# The backlog query: only unsynced rows are in this index, so it stays tiny however many
# synced rows the table holds, and inserting a reading touches one small index page.
_PENDING_INDEX = ("CREATE INDEX IF NOT EXISTS sensor_data_pending "
                  "ON sensor_data (id) WHERE synced = 0")


def _create(db, models) -> None:
    db.create_tables(models)
    db.execute_sql(_PENDING_INDEX)


# version -> step that upgrades a database from version-1 to version.
STEPS: dict = {}


class SchemaTooNew(RuntimeError):
    pass


def migrate(db, models) -> int:
    current = db.pragma("user_version")
    if current > SCHEMA_VERSION:
        raise SchemaTooNew(f"{db.database} has schema v{current}, newer than this gateway's "
                           f"v{SCHEMA_VERSION}: upgrade the gateway, do not delete the file")
    if current == SCHEMA_VERSION:
        return current
    with db.atomic():
        if current == 0 and not db.table_exists("sensor_data"):
            _create(db, models)
        else:
            migrator = SqliteMigrator(db)
            for version in range(current + 1, SCHEMA_VERSION + 1):
                log.info("migrating %s to schema v%d", db.database, version)
                STEPS[version](db, migrator)
        db.pragma("user_version", SCHEMA_VERSION)
    return SCHEMA_VERSION
