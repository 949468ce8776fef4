"""The store (peewee over SQLite), by concern:

- ``schema``: the tables and their status constants; each store binds its own copies;
- ``store``: ``Store`` (the guide's ``DatabaseManager``): readings, ledger, actuators, sinks;
- ``outbox``: what each sink is owed (alerts and command outcomes), one mechanism for both;
- ``retention``: the ``MAX_DB_MB`` budget; ``stats``: the guide's stats;
- ``migrations``: schema versions in ``PRAGMA user_version``.

The guide's troubleshooting query (``SELECT COUNT(*) FROM sensor_data WHERE synced = 0``)
works on the file as it is.
"""
from mash.models.migrations import COMPATIBLE_FROM, SCHEMA_VERSION, SchemaTooNew
from mash.models.schema import (ACK, ALERT, COMPLETED, FAILED, FINAL, LOCAL, MODELS, PENDING,
                                QUEUED, REJECTED, RUNNING, SYNCED, bind_models)
from mash.models.store import DatabaseManager, Store, StoreCorrupt, StoreMissing, StoreOutdated

__all__ = ["Store", "DatabaseManager", "StoreMissing", "StoreCorrupt",
           "StoreOutdated", "MODELS", "bind_models", "SCHEMA_VERSION", "COMPATIBLE_FROM", "SchemaTooNew",
           "PENDING", "SYNCED", "REJECTED", "LOCAL", "QUEUED", "RUNNING", "COMPLETED", "FAILED", "FINAL",
           "ALERT", "ACK"]
