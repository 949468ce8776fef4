"""Identities, each built in one place: reading ids, alert ids, batch keys, Firebase keys.

A reading id is ``<source uid>-<sequence>``: the store's uid (12 random hex digits made with
the file, so a replaced SD card never reuses an id the backend has seen) and the row id
(never reused within a file). The guide's direct ``send_sensor_data`` uses the same scheme
with the ids the store gave the reading, or its own uid and counter for one never stored.
"""
from __future__ import annotations

import datetime as dt
import secrets


def new_uid() -> str:
    return secrets.token_hex(6)


def reading_id(uid: str, seq: int) -> str:
    return f"{uid}-{seq}"


def alert_id(uid: str, seq: int) -> str:
    return f"{uid}-a{seq}"


def batch_key(reading_ids: list[str]) -> str:
    """The Idempotency-Key of an upload: the same batch always sends the same key."""
    return f"{reading_ids[0]}.{reading_ids[-1]}.{len(reading_ids)}"


def firebase_key(ts: dt.datetime, previous: str | None = None) -> str:
    """``YYYY-MM-DDTHH-MM-SS`` (UTC) of ``ts``; ``-1``, ``-2`` ... when ``previous`` (the
    room's last key) is of the same second. Fixed when the reading is stored, so a batch sent
    twice overwrites itself (CONTRACT §4)."""
    if ts.tzinfo is not None:
        ts = ts.astimezone(dt.timezone.utc)
    base = ts.strftime("%Y-%m-%dT%H-%M-%S")
    if previous and (previous == base or previous.startswith(base + "-")):
        n = int(previous.rsplit("-", 1)[1]) + 1 if previous != base else 1
        return f"{base}-{n}"
    return base


def firebase_key_order(key: str) -> tuple[str, int]:
    """Sort key for one second's Firebase keys: ``base`` < ``base-1`` < ``base-2`` < ``base-10``."""
    base, _, n = key[:19], key[19:20], key[20:]
    return base, int(n) if n.isdigit() else 0


AUTO_PREFIX = "auto-"


def auto_command_id() -> str:
    """A ledger id for the climate controller's own command."""
    return f"{AUTO_PREFIX}{secrets.token_hex(8)}"
