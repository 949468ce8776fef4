"""The board-command driver: the ledger's ``set_actuator`` commands to the board, one at a
time, with the board's replies matched in order (CONTRACT §1: they carry no id).

The reader owns the port and calls ``drive`` in its loop and ``on_reply`` / ``on_reset`` /
``on_recovered`` for the lines that concern commands. Timing, from the firmware source: a
sensor read can block the board's loop ~3 s on an I2C timeout, so a ``[CMD]`` reply may take
up to ~7 s; a command is written again only after ACK_TIMEOUT (8 s) without one.
"""
from __future__ import annotations

import json
import logging
import time
from collections import deque
from dataclasses import dataclass

from mash import protocol
from mash.clock import utcnow
from mash.models import COMPLETED, FAILED

log = logging.getLogger("mash.reader")


@dataclass
class InFlight:
    actuator: str
    state: str
    command_id: str | None       # None for a re-sent desired state
    written_at: float
    attempts: int
    source: str = "restore"       # the ledger's source, or "restore"


class BoardCommands:
    ACK_TIMEOUT = 8.0
    ACK_ATTEMPTS = 3
    LEDGER_POLL = 0.1

    def __init__(self, store, count_bad, on_settled=None, restorable=None, record=None,
                 holding=None):
        self.store = store
        # fn(kind, write): what the board answered goes into the ledger through the reader's
        # write-or-hold path (a store failure never loses a reply); holding() says replies
        # are still held, so the ledger (not up to date) is not read for the next command
        self.record = record or (lambda kind, write: write())
        self.holding = holding or (lambda: False)
        self.count_bad = count_bad        # fn(kind, detail): an unexpected reply is a bad line
        # fn(actuator, state, source, ok): a relay command ended (the climate controller)
        self.on_settled = on_settled or (lambda actuator, state, source, ok: None)
        # fn() -> {actuator: state}: what to restore after a reset or a watchdog recovery
        self.restorable = restorable or store.desired_states
        self.inflight: InFlight | None = None
        self.resync: deque[tuple[str, str]] = deque()
        # the climate controller's commands: written like the ledger's, and recorded in the
        # ledger once the board answered (one write per switch; after a crash the
        # controller decides afresh, so an unanswered one needs no record)
        self.auto: deque[tuple[str, str, str]] = deque()
        self._next_ledger = 0.0
        self._data_version = None
        self._hint = False

    def submit(self, command_id: str, actuator: str, state: str) -> None:
        """A command of the climate controller's, written before the ledger's next one."""
        self.auto.append((command_id, actuator, state))

    def poke(self) -> None:
        """This process put a command in the ledger: look at once (its own commit does not
        change what ``data_version`` reports to it)."""
        self._next_ledger = 0.0
        self._data_version = None

    def hinted(self) -> None:
        """Another process committed (a wake-up hint): look at the ledger when next due."""
        self._hint = True

    def next_look(self, now: float, idle: float) -> float:
        """Seconds the reader may wait before ``drive`` has something to do: a tenth while a
        command is under way, until the ledger's next look after a hint (looks stay
        ``LEDGER_POLL`` apart however many commits there are), else ``idle``."""
        if self.inflight or self.resync or self.auto:
            return self.LEDGER_POLL
        if self._hint and not self.holding():
            return max(0.0, min(idle, self._next_ledger - now))
        return idle

    def on_reconnect(self) -> None:
        """A new link: a command written on the old one is written again."""
        self._next_ledger = 0.0
        self._data_version = None
        if self.inflight:
            self.inflight.written_at = 0.0

    def on_reset(self, line: str) -> None:
        """``[READY]``: the board booted with every relay OFF. Restore every desired state,
        then write again the command the reset swallowed."""
        desired = self.restorable()
        log.info("board reset (%s): relays are OFF, restoring %d desired state(s)", line,
                 len(desired))
        self.resync = deque(desired.items())
        if self.inflight and self.inflight.command_id is None:
            self.inflight = None
        elif self.inflight:
            self.inflight.written_at = 0.0

    def on_recovered(self, line: str) -> None:
        """``{"watchdog":"recovered"}``: relays are as they were and a command written just
        before still runs (its reply is still awaited). Re-send every desired state anyway:
        harmless when unchanged."""
        desired = self.restorable()
        log.info("board watchdog recovered: re-sending %d desired state(s)", len(desired))
        self.resync = deque(desired.items())

    def on_reply(self, ok: bool, msg) -> None:
        flight = self.inflight
        if flight is None:
            log.warning("board reply with no command waiting: %s", msg.line)
            self.count_bad("unexpected_reply", msg.line)
            return
        if ok and (msg.actuator, msg.state) != (flight.actuator, flight.state):
            log.warning("board confirmed %s %s while %s %s was waiting; ignoring it",
                        msg.actuator, msg.state, flight.actuator, flight.state)
            self.count_bad("unexpected_reply", msg.line)
            return
        self.inflight = None
        self.poke()                        # the next queued command goes at once
        self.on_settled(flight.actuator, flight.state, flight.source, ok)
        if flight.command_id is None:
            if not ok:
                log.error("board refused restoring %s %s: %s", flight.actuator, flight.state,
                          msg.line)
            return
        response = {"actuator": flight.actuator, "state": flight.state, "board": msg.line}
        desired = (flight.actuator, flight.state) if ok else None
        if flight.source == "auto":
            self._record_auto(flight, ok, None if ok else msg.line, response)
        else:
            self.record("command", lambda: self.store.finish_command(
                flight.command_id, ok, reason=None if ok else msg.line, response=response,
                desired=desired))
        # the climate controller's own switches are logged by it, a line per rule change
        log.log(logging.DEBUG if flight.source == "auto" and ok else logging.INFO,
                "command %s %s: %s", flight.command_id, "completed" if ok else "failed", msg.line)

    def _record_auto(self, flight: InFlight, ok: bool, reason: str | None,
                     response: dict | None) -> None:
        self.record("command", lambda: self.store.add_command(
            flight.command_id, "set_actuator", {"actuator": flight.actuator, "state": flight.state},
            "auto", status=COMPLETED if ok else FAILED, reason=reason, response=response or {},
            desired=(flight.actuator, flight.state) if ok else None))

    def drive(self, write, now: float | None = None) -> None:
        """Write what is due: a command again after ACK_TIMEOUT, a desired state to restore,
        or the ledger's next command. ``write(bytes)`` writes to the board."""
        now = time.monotonic() if now is None else now
        flight = self.inflight
        if flight is not None:
            if flight.written_at and now - flight.written_at < self.ACK_TIMEOUT:
                return
            if flight.written_at and flight.attempts >= self.ACK_ATTEMPTS:
                self.inflight = None
                self.on_settled(flight.actuator, flight.state, flight.source, False)
                reason = f"no reply from the board after {flight.attempts} attempts"
                if flight.source == "auto":
                    self._record_auto(flight, False, reason, None)
                    log.warning("control: %s %s failed: %s", flight.actuator, flight.state, reason)
                elif flight.command_id:
                    command_id = flight.command_id
                    self.record("command", lambda: self.store.finish_command(
                        command_id, False, reason=reason))
                    log.warning("command %s failed: %s", flight.command_id, reason)
                else:
                    log.warning("restoring %s %s: %s", flight.actuator, flight.state, reason)
                return
            flight.attempts += 1
            flight.written_at = now
            write(protocol.encode_command(flight.actuator, flight.state))
            return
        if self.resync:
            actuator, state = self.resync.popleft()
            self.inflight = InFlight(actuator, state, None, now, 1)
            write(protocol.encode_command(actuator, state))
            return
        if self.auto:
            command_id, actuator, state = self.auto.popleft()
            self.inflight = InFlight(actuator, state, command_id, now, 1, "auto")
            write(protocol.encode_command(actuator, state))
            return
        if now < self._next_ledger or self.holding():
            return
        self._next_ledger = now + self.LEDGER_POLL
        self._hint = False
        version = self.store.data_version()
        if version == self._data_version:
            return
        cmd = self.store.next_board_command()
        if cmd is None:
            self._data_version = version     # nothing new until another process commits
            return
        params = json.loads(cmd.parameters or "{}")
        command_id = cmd.command_id
        if cmd.expires_at is not None and cmd.expires_at < utcnow():
            self.record("command", lambda: self.store.finish_command(
                command_id, False, reason="expired before it reached the board"))
            return
        try:
            line = protocol.encode_command(params.get("actuator"), params.get("state"))
        except ValueError as exc:
            reason = f"malformed: {exc}"
            self.record("command", lambda: self.store.finish_command(command_id, False,
                                                                     reason=reason))
            return
        attempts = self.store.start_command(cmd.command_id)
        payload = json.loads(line)
        self.inflight = InFlight(payload["actuator"], payload["state"], cmd.command_id, now,
                                 attempts, cmd.source)
        write(line)
