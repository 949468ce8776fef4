"""The command ledger and the relays' desired states, part of the store (``Store`` mixes
this in): one row per command id, whichever channel brought it, and the state each relay
should be in after a reset."""
from __future__ import annotations

import datetime as dt
import functools
import json

from peewee import IntegrityError

from mash.clock import iso, utcnow
from mash.models.apps_outbox import owe_relay
from mash.models.outbox import ACK, ack_payload
from mash.models.schema import COMPLETED, FAILED, FINAL, QUEUED, RUNNING

# meta key: the command ids the backend's last poll listed as pending or sent
BACKEND_LISTED = "commands.backend_listed"


def writes(method):
    """Mark a Store method that writes: it runs under the store's write lock, and its commit
    wakes the store's listeners once (``Store._write_scope``).

    SQLite serialises writers anyway, but a thread that finds the database locked sleeps in
    SQLite's busy handler (1, 2, 5 ... 100 ms steps); a Python lock wakes the next writer as
    soon as the last one commits."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._write_scope():
            return method(self, *args, **kwargs)
    return locked


class LedgerMixin:
    """Needs ``self.m`` (the bound models), ``self.outbox``, ``self.transaction()`` and
    ``self._write_scope()`` from the Store."""

    # -- command ledger -----------------------------------------------------------------
    @writes
    def add_command(self, command_id: str, command: str, parameters: dict, source: str,
                    expires_at: dt.datetime | None = None, status: str = QUEUED,
                    reason: str | None = None, response: dict | None = None,
                    desired: tuple[str, str] | None = None,
                    now: dt.datetime | None = None) -> bool:
        """Put a command in the ledger once; False when its id was already there. A command
        added already final (rejected, or the climate controller's own once the board
        answered) is owed to the sinks at once, with the relay's new state when it
        completed: one transaction. ``now``: the time it is recorded at (default the
        clock's)."""
        C = self.m.Command
        now = now or utcnow()
        final = status in FINAL
        try:
            with self.transaction():
                if C.select().where(C.command_id == command_id).exists():
                    return False
                cmd = C.create(command_id=command_id, command=command,
                               parameters=json.dumps(parameters), source=source,
                               received_at=now, expires_at=expires_at, status=status,
                               reason=reason, finished_at=now if final else None,
                               response=json.dumps(response) if response is not None else None,
                               attempts=1 if final and response is not None else 0)
                if final:
                    self.outbox.add(ACK, command_id, ack_payload(cmd), now=now)
                if desired and status == COMPLETED:
                    self.set_desired(*desired, source=source, now=now)
        except IntegrityError:      # another thread or process stored it first
            return False
        return True

    def note_backend_listed(self, command_ids) -> None:
        """The ids the backend's last command poll listed as ``pending`` or ``sent``:
        retention keeps their ledger rows however old, since the poll would run a listed id
        missing from the ledger again. Written only when the set changes (normally it is
        empty between commands)."""
        listed = sorted({c for c in command_ids if isinstance(c, str)})
        if self.meta_get(BACKEND_LISTED, []) != listed:
            self.meta_set(BACKEND_LISTED, listed)

    def backend_listed(self) -> set[str]:
        return set(self.meta_get(BACKEND_LISTED, []))

    def known_command(self, command_id: str) -> bool:
        """Is ``command_id`` in the ledger, whatever its status?"""
        C = self.m.Command
        return C.select().where(C.command_id == command_id).exists()

    def command(self, command_id: str):
        """The ledger row of ``command_id``, or None."""
        return self.m.Command.get_or_none(self.m.Command.command_id == command_id)

    def next_board_command(self):
        """The oldest ``set_actuator`` not yet final, or None."""
        C = self.m.Command
        return (C.select().where(C.status.in_([QUEUED, RUNNING]) & (C.command == "set_actuator"))
                .order_by(C.seq).first())

    @writes
    def claim_command(self):
        """Atomically take the next queued ``set_actuator`` for an executor other than the
        reader (the guide's sync manager): mark it running and return it, or None."""
        with self.transaction():
            cmd = self.next_board_command()
            if cmd is None or cmd.status != QUEUED:
                return None
            self.start_command(cmd.command_id)
            return cmd

    @writes
    def start_command(self, command_id: str) -> int:
        """Mark a command running (another attempt); returns its attempt count."""
        C = self.m.Command
        with self.transaction():
            C.update(status=RUNNING, attempts=C.attempts + 1).where(
                C.command_id == command_id).execute()
            return C.get(C.command_id == command_id).attempts

    @writes
    def finish_command(self, command_id: str, ok: bool, reason: str | None = None,
                       response: dict | None = None,
                       desired: tuple[str, str] | None = None,
                       now: dt.datetime | None = None) -> bool:
        """Atomically record a command's final status once, owe its ack to every sink and,
        for a relay that switched, remember the desired state. False if it was already
        final."""
        C = self.m.Command
        now = now or utcnow()
        with self.transaction():
            changed = (C.update(status=COMPLETED if ok else FAILED, reason=reason,
                                response=json.dumps(response or {}), finished_at=now)
                       .where((C.command_id == command_id) & C.status.not_in(FINAL)).execute())
            if changed:
                cmd = self.command(command_id)
                self.outbox.add(ACK, command_id, ack_payload(cmd), now=now)
                if desired:
                    self.set_desired(*desired, source=cmd.source, now=now)
        return bool(changed)

    # -- actuators ----------------------------------------------------------------------
    def desired_states(self, exclude_source: str | None = None) -> dict[str, str]:
        """{actuator: ON|OFF}: the state each relay should be in (the last a completed
        command set), restored after a board reset; without those ``exclude_source`` set
        (the climate controller decides its own afresh)."""
        A = self.m.ActuatorState
        query = A.select().order_by(A.actuator)
        if exclude_source is not None:
            query = query.where(A.source != exclude_source)
        return {a.actuator: a.desired for a in query}

    def actuator_states(self) -> dict[str, dict]:
        """{actuator: {"state", "source", "since"}} as the board last confirmed them."""
        A = self.m.ActuatorState
        return {a.actuator: {"state": a.desired, "source": a.source, "since": iso(a.updated_at)}
                for a in A.select().order_by(A.actuator)}

    @writes
    def set_desired(self, actuator: str, state: str, source: str = "local",
                    now: dt.datetime | None = None) -> None:
        """Remember the state ``actuator`` should be in and who set it (``since`` moves only
        when the state changes)."""
        A = self.m.ActuatorState
        row = A.get_or_none(A.actuator == actuator)
        if row is not None and row.desired == state:
            if row.source != source:
                A.update(source=source).where(A.actuator == actuator).execute()
            return
        owe_relay(self, actuator, state, source)
        A.replace(actuator=actuator, desired=state, updated_at=now or utcnow(),
                  source=source).execute()
