"""Wall-clock helpers in the one format every store column and wire message uses.

Timestamps are naive UTC in the store and ISO 8601 with milliseconds and ``Z`` on the wire
(the backend's format).
"""
from __future__ import annotations

import datetime as dt


def utcnow() -> dt.datetime:
    """Naive UTC: what every timestamp column holds."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def iso(ts: dt.datetime | None) -> str | None:
    """ISO 8601 with milliseconds and Z, the backend's format."""
    if ts is None:
        return None
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def parse_iso(value) -> dt.datetime | None:
    """An ISO 8601 string (with Z or an offset) as naive UTC, or None when it is not one."""
    if not isinstance(value, str) or len(value) > 40:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return parsed


def from_epoch(seconds: float) -> dt.datetime:
    """Epoch seconds as naive UTC."""
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).replace(tzinfo=None)


def as_datetime(value) -> dt.datetime | None:
    """A datetime as SQLite aggregates return it (a string) or as peewee does (a datetime)."""
    if isinstance(value, str):
        return dt.datetime.fromisoformat(value)
    return value


def to_epoch(ts: dt.datetime) -> float:
    """A naive-UTC datetime as epoch seconds."""
    return ts.replace(tzinfo=dt.timezone.utc).timestamp()
