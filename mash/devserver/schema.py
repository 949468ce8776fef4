"""The reference backend's tables (peewee) and small helpers."""
from __future__ import annotations

import datetime as dt
import hashlib
import math
import secrets

from peewee import (CharField, DateTimeField, FloatField, IntegerField, Model, SqliteDatabase,
                    TextField)

from mash.contract import MAX_READINGS_PER_REQUEST


devdb = SqliteDatabase(None)
MAX_BODY = 5 * 1024 * 1024
MAX_READINGS = MAX_READINGS_PER_REQUEST


class _M(Model):
    class Meta:
        database = devdb


class User(_M):
    email = CharField(unique=True)
    password_hash = CharField()
    role = CharField(default="GROWER")
    refresh_jti = CharField(null=True)


class Device(_M):
    serial_number = CharField(unique=True)
    uid = CharField()
    name = CharField()
    type = CharField()
    location = CharField(null=True)
    firmware = CharField(null=True)
    status = CharField(default="OFFLINE")
    last_seen = CharField(null=True)
    metadata = TextField(default="{}")
    updates = IntegerField(default=0)


class Reading(_M):
    device = CharField()
    reading_id = CharField()
    room = CharField()
    temperature = FloatField()
    humidity = FloatField()
    co2 = FloatField()
    timestamp = CharField()

    class Meta:
        indexes = ((("device", "reading_id"), True),)


_INSERT_READING = ('INSERT OR IGNORE INTO "reading" ("device", "reading_id", "room", "temperature", '
                   '"humidity", "co2", "timestamp") VALUES (?, ?, ?, ?, ?, ?, ?)')


class IdempotentResponse(_M):
    key = CharField(unique=True)
    body = TextField()


class DevCommand(_M):
    command_id = CharField(unique=True)
    device = CharField()
    command = CharField()
    parameters = TextField(default="{}")
    status = CharField(default="pending")
    created_at = DateTimeField()
    sent_at = CharField(null=True)
    expires_at = CharField(null=True)
    response = TextField(null=True)
    acknowledged_at = CharField(null=True)
    acks = IntegerField(default=0)


class DevAlert(_M):
    device = CharField()
    event_type = CharField()
    severity = CharField()
    message = TextField()
    data = TextField()
    triggered_at = CharField()


class DeviceConfiguration(_M):
    device = CharField(unique=True)
    body = TextField()


MODELS = [User, Device, Reading, IdempotentResponse, DevCommand, DevAlert, DeviceConfiguration]


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(8)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, 10_000)
    return salt.hex() + "$" + digest.hex()


def check_password(password: str, stored: str) -> bool:
    salt, _ = stored.split("$", 1)
    return secrets.compare_digest(hash_password(password, bytes.fromhex(salt)), stored)


def _iso_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _is_iso(value) -> bool:
    if not isinstance(value, str) or not 10 <= len(value) <= 40:
        return False
    try:
        dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        return True
    except ValueError:
        return False


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


