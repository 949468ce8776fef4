"""The store's tables (peewee models) and their status constants.

The models here are unbound: each ``Store`` binds its own copies to its own database
(``bind_models``), so two stores on two files live in one process without a global ``db``
being re-pointed under anyone's feet.
"""
from __future__ import annotations

from types import SimpleNamespace

from peewee import (AutoField, CharField, DateTimeField, FloatField, IntegerField, Model,
                    TextField)

# sensor_data.synced
PENDING, SYNCED, REJECTED = 0, 1, -1

# commands.status
QUEUED, RUNNING, COMPLETED, FAILED = "queued", "running", "completed", "failed"
FINAL = (COMPLETED, FAILED)

# outbox.kind: what an outbox row carries to a sink
ALERT, ACK = "alert", "ack"
# the sinks that are owed every alert and every command outcome
OUTBOX_SINKS = ("backend", "mqtt")


class SensorData(Model):
    """One row per room per reading line. ``synced``: 0 pending, 1 accepted, -1 rejected."""
    id = AutoField()
    room = CharField()
    temperature = FloatField()
    humidity = FloatField()
    co2 = IntegerField()
    timestamp = DateTimeField()             # UTC, when the gateway received the line
    synced = IntegerField(default=PENDING)
    synced_at = DateTimeField(null=True)
    fb_key = CharField()                     # Firebase key, fixed at store time (CONTRACT §4)
    # Stamped before the clock was synchronized: CLOCK_BOOTTIME at receipt and the boot it
    # counts from. Held back from every sink until rebased to wall time (mash.timekeeper).
    mono = FloatField(null=True)
    boot = CharField(null=True)
    # 1 when the line came from the built-in simulated board, not a real Arduino
    simulated = IntegerField(default=0)

    class Meta:
        table_name = "sensor_data"


class Alert(Model):
    """A threshold condition starting (``raised``) or ending (``cleared``)."""
    id = AutoField()
    event_type = CharField()
    severity = CharField()
    room = CharField(null=True)
    value = FloatField(null=True)
    threshold = FloatField(null=True)
    message = TextField()
    state = CharField()                      # raised | cleared
    created_at = DateTimeField()

    class Meta:
        table_name = "alerts"


class Command(Model):
    """The command ledger: one row per command id, whichever channel brought it."""
    seq = AutoField()
    command_id = CharField(unique=True)
    command = CharField()
    parameters = TextField(default="{}")
    source = CharField()                     # backend | mqtt | local | auto
    received_at = DateTimeField()
    expires_at = DateTimeField(null=True)
    status = CharField()                     # queued | running | completed | failed
    reason = TextField(null=True)
    response = TextField(null=True)
    attempts = IntegerField(default=0)
    finished_at = DateTimeField(null=True)

    class Meta:
        table_name = "commands"


class Outbox(Model):
    """What a sink is owed: one row per item per sink, its message fixed when it was made,
    done once the sink confirmed it (or refused it for good: ``error``)."""
    id = AutoField()
    kind = CharField()                       # alert | ack
    ref = CharField()                        # the alert's row id or the command id
    sink = CharField()                       # backend | mqtt
    payload = TextField()
    created_at = DateTimeField()
    done_at = DateTimeField(null=True)
    error = TextField(null=True)

    class Meta:
        table_name = "outbox"


class ActuatorState(Model):
    """Each relay's state as the board last confirmed it, who set it and since when."""
    actuator = CharField(primary_key=True)
    desired = CharField()
    updated_at = DateTimeField()
    source = CharField(default="backend")    # backend | mqtt | local | auto

    class Meta:
        table_name = "actuator_state"


class Counter(Model):
    name = CharField(primary_key=True)
    value = IntegerField(default=0)

    class Meta:
        table_name = "counters"


class SinkState(Model):
    """What each sink last did, so any process reports the same ``mash status``.
    ``progress``: every reading id up to it is done for that sink (backend: synced or
    rejected; firebase: backed up)."""
    name = CharField(primary_key=True)       # backend | mqtt | firebase
    online = IntegerField(default=0)
    last_ok = DateTimeField(null=True)
    last_error = TextField(null=True)
    progress = IntegerField(default=0)

    class Meta:
        table_name = "sink_state"


class KeyValue(Model):
    """Small facts: database uid, CONFIGURE'd settings, last rejection, storage state."""
    key = CharField(primary_key=True)
    value = TextField()

    class Meta:
        table_name = "meta"


MODELS = (SensorData, Alert, Command, Outbox, ActuatorState, Counter, SinkState, KeyValue)


# Indexes where a hot loop looks for the few open rows among many closed ones: the reader's
# next board command (by status), each sink's owed outbox items (partial: an item leaves the
# index once delivered, so it stays the size of the work in hand). Schema v5: the owed items
# that are not the climate controller's acks (the scheduler's "deliver now?", every tick), the
# grower's own commands (the dashboard), each condition's latest alert (retention, start-up).
# The partial ones cost no write for the rows they leave out (the controller's switches).
INDEXES = (
    "CREATE INDEX IF NOT EXISTS commands_status ON commands (status, seq)",
    "CREATE INDEX IF NOT EXISTS outbox_owed ON outbox (sink, id) WHERE done_at IS NULL",
    # the literal must match Outbox.owed's query text (ids.AUTO_PREFIX)
    "CREATE INDEX IF NOT EXISTS outbox_urgent ON outbox (id) "
    "WHERE done_at IS NULL AND substr(ref, 1, 5) <> 'auto-'",
    "CREATE INDEX IF NOT EXISTS commands_local ON commands (seq) WHERE source = 'local'",
    "CREATE INDEX IF NOT EXISTS alerts_key ON alerts (room, event_type, id)",
)


def create_indexes(database) -> None:
    for statement in INDEXES:
        database.execute_sql(statement)


def bind_models(database) -> SimpleNamespace:
    """Copies of every model bound to ``database``: ``models.SensorData`` and so on."""
    bound = {}
    for model in MODELS:
        meta = type("Meta", (), {"database": database, "table_name": model._meta.table_name})
        bound[model.__name__] = type(model.__name__, (model,),
                                     {"Meta": meta, "__module__": model.__module__})
    return SimpleNamespace(**bound)
