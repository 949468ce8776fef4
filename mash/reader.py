"""The serial reader service: the only process that touches the serial port.

It reads lines from the board, stores good readings (both rooms of a line in one
transaction), counts bad lines, raises threshold alerts, keeps the board's watchdog fed, and
writes the ``set_actuator`` commands that the worker put in the ledger, matching the board's
replies in order. It never talks to the cloud: it wakes the worker through the Huey queue when
an alert or a command outcome is ready, and the worker also sweeps on its own schedule.
"""
from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass

import serial
from peewee import DatabaseError
from serial.tools import list_ports

from mash import protocol
from mash.alerts import AlertEngine
from mash.config import ConfigError, Settings, merge_thresholds
from mash.logs import OncePerKind
from mash.models import DatabaseManager, utcnow

log = logging.getLogger("mash.reader")

ARDUINO_VID = 0x2341


def find_board() -> str | None:
    """The first Arduino (USB vendor 0x2341), else the first ttyACM/ttyUSB device."""
    ports = sorted(list_ports.comports(), key=lambda p: p.device)
    for p in ports:
        if p.vid == ARDUINO_VID:
            return p.device
    for p in ports:
        if p.device.startswith(("/dev/ttyACM", "/dev/ttyUSB")):
            return p.device
    return None


@dataclass
class InFlight:
    actuator: str
    state: str
    command_id: str | None       # None for a re-sent desired state
    written_at: float
    attempts: int


def _default_notify(kind: str) -> None:
    """Wake the worker: enqueue the delivery task for ``kind`` (alerts | acks)."""
    try:
        from mash import tasks
        (tasks.deliver_alerts if kind == "alerts" else tasks.deliver_acks)()
    except Exception as exc:   # the worker's periodic sweep delivers it anyway
        log.debug("could not wake the worker for %s: %s", kind, exc)


class Reader:
    KEEPALIVE_EVERY = 15.0
    SILENCE = 30.0
    ACK_TIMEOUT = 2.0
    ACK_ATTEMPTS = 3
    RECONNECT_MAX = 2.0
    LEDGER_POLL = 0.1
    SUMMARY_EVERY = 60.0
    BUDGET_EVERY = 60.0
    UNSTORED_MAX = 50_000

    def __init__(self, settings: Settings, store: DatabaseManager | None = None, notify=None):
        self.settings = settings
        self.store = store or DatabaseManager(settings.db_path)
        self.notify = notify or _default_notify
        self.stop_event = threading.Event()
        self.engine = AlertEngine(settings.thresholds, settings.stale_after,
                                  active=self.store.active_alert_keys())
        self._configured = None
        self._reload_configuration()
        self.bad = OncePerKind(log, "bad line from board")
        self.bad_counts: dict[str, int] = {}
        self.inflight: InFlight | None = None
        self.resync: deque[tuple[str, str]] = deque()
        self.stored_rows = 0
        self.connected_port: str | None = None
        self.connections = 0
        self.unstored: deque = deque(maxlen=self.UNSTORED_MAX)
        self.store_error: str | None = None
        self._storage_over = (self.store.meta_get("storage") or {}).get("over")
        self._last_budget = 0.0
        self._last_housekeeping = 0.0
        self._last_summary = time.monotonic()
        self._summary_base = (0, 0)
        self._sim = None

    # -- lifecycle ----------------------------------------------------------------------
    def stop(self, *_):
        self.stop_event.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def _port(self) -> str | None:
        port = self.settings.serial_port
        if port == "sim":
            if self._sim is None:
                from mash.simulator import SimulatedBoard
                self._sim = SimulatedBoard(interval=5.0).start()
                log.info("no board configured: using the simulated board on %s", self._sim.port)
            return self._sim.port
        return port or find_board()

    def run(self) -> None:
        """Open the board, read until it goes away, reopen: forever, until stopped."""
        delay, last_problem = 0.25, None
        try:
            while not self.stop_event.is_set():
                port = self._port()
                try:
                    if not port:
                        raise serial.SerialException("no board found (no /dev/ttyACM* or /dev/ttyUSB*)")
                    link = serial.Serial(port, self.settings.serial_baud, timeout=0.1,
                                         exclusive=True)
                except (serial.SerialException, OSError, ValueError) as exc:
                    problem = str(exc)
                    if problem != last_problem:
                        log.warning("board not available: %s; retrying", problem)
                        last_problem = problem
                    self.housekeeping()
                    self.stop_event.wait(delay)
                    delay = min(delay * 2, self.RECONNECT_MAX)
                    continue
                delay, last_problem = 0.25, None
                self.connected_port = port
                self.connections += 1
                log.info("board connected on %s", port)
                try:
                    why = self._session(link)
                finally:
                    try:
                        link.close()
                    except Exception:
                        pass
                    self.connected_port = None
                if why:
                    log.warning("board lost: %s; reconnecting", why)
        finally:
            self._flush_counts()
            if self._sim:
                self._sim.stop()
            log.info("reader stopped")

    # -- one connection -----------------------------------------------------------------
    def _session(self, link: serial.Serial) -> str | None:
        buf = bytearray()
        discarding = False
        now = time.monotonic()
        self.last_line = self.last_write = now
        self._next_ledger = 0.0
        self._data_version = None
        if self.inflight:          # written on a link that died: write it again
            self.inflight.written_at = 0.0
        try:
            # No reset_input_buffer(): what the board said while we were away (a banner
            # after a replug, readings during a restart) is real and is read, not dropped.
            while not self.stop_event.is_set():
                chunk = link.read(link.in_waiting or 1)
                now = time.monotonic()
                if chunk:
                    buf += chunk
                    while True:
                        nl = buf.find(b"\n")
                        if nl < 0:
                            break
                        line = bytes(buf[:nl])
                        del buf[:nl + 1]
                        if discarding:
                            discarding = False
                            continue
                        self.last_line = now
                        self.handle_line(line, link)
                    if len(buf) > protocol.MAX_LINE:
                        self._count_bad("too_long", f"more than {protocol.MAX_LINE} bytes without a newline")
                        buf.clear()
                        discarding = True
                if now - self.last_line > self.SILENCE:
                    return f"no line for {self.SILENCE:.0f} s"
                try:
                    self._drive_commands(link, now)
                    self.housekeeping()
                except DatabaseError as exc:     # disk full, locked: the serial side goes on
                    log.debug("store busy or full: %s", exc)
                if now - self.last_write >= self.KEEPALIVE_EVERY:
                    self._write(link, protocol.KEEPALIVE)
        except (serial.SerialException, OSError) as exc:
            return str(exc) or exc.__class__.__name__
        return None

    def _write(self, link: serial.Serial, data: bytes) -> None:
        link.write(data)
        link.flush()
        self.last_write = time.monotonic()

    # -- lines --------------------------------------------------------------------------
    def handle_line(self, raw: bytes, link: serial.Serial | None = None) -> None:
        msg = protocol.parse_line(raw)
        if isinstance(msg, protocol.Reading):
            for room, kind in msg.rejected.items():
                self._count_bad(kind, f"{room}: {raw[:120]!r}")
            if msg.rooms:
                self._store_reading(msg)
        elif isinstance(msg, protocol.Bad):
            self._count_bad(msg.kind, msg.detail)
        elif isinstance(msg, protocol.Ack):
            self._on_reply(True, msg)
        elif isinstance(msg, protocol.CommandError):
            self._on_reply(False, msg)
        elif isinstance(msg, protocol.BoardReset):
            self._on_reset(msg.line)
        elif isinstance(msg, protocol.Watchdog):
            log.warning("board watchdog: %s", msg.line)
        else:
            log.debug("board: %s", getattr(msg, "line", msg))

    def _count_bad(self, kind: str, detail: str) -> None:
        self.bad_counts[kind] = self.bad_counts.get(kind, 0) + 1
        self.bad(kind, detail)

    def _store_reading(self, msg: protocol.Reading) -> None:
        data = {r.room: {"temp": r.temp, "humidity": r.humidity, "co2": r.co2} for r in msg.rooms}
        events = []
        for r in msg.rooms:
            events += self.engine.check_reading(r.room, r.temp, r.humidity, r.co2)
        self.unstored.append((data, utcnow(), events))
        self._flush_unstored()
        if self.stored_rows == 0 and not self.unstored:
            log.info("readings flowing: first reading stored (%s)",
                     ", ".join(f"{r.room} {r.temp:g} C {r.humidity:g} % {r.co2} ppm" for r in msg.rooms))
        self.stored_rows += len(msg.rooms)

    def _flush_unstored(self) -> None:
        """Write held readings, oldest first, each line with its alerts in one transaction.

        A write that fails (disk full, database locked too long) keeps the line in memory,
        with its arrival time, and is tried again every few seconds; nothing is dropped
        until the buffer's bound (UNSTORED_MAX lines, days at the board's rate)."""
        from peewee import DatabaseError
        raised = False
        while self.unstored:
            data, ts, events = self.unstored[0]
            cause = None
            try:
                with self.store.transaction():
                    try:
                        self.store.save_sensor_data(data, timestamp=ts)
                        if events:
                            self.store.add_alerts(events)
                    except DatabaseError as exc:
                        cause = exc     # on SQLITE_FULL SQLite rolls back itself, and peewee's
                        raise           # own rollback then fails with a less useful message
            except DatabaseError as exc:
                exc = cause or exc
                if self.store_error is None:
                    log.error("cannot write to the store (%s): holding readings in memory and "
                              "retrying", exc)
                self.store_error = str(exc)
                return
            self.unstored.popleft()
            for e in events:
                log.info("alert %s: %s (%s)", e.state, e.message, e.severity)
            raised = raised or bool(events)
        if self.store_error is not None:
            log.info("store writable again: held readings written")
            self.store_error = None
        if raised:
            self.notify("alerts")

    # -- commands -----------------------------------------------------------------------
    def _on_reset(self, line: str) -> None:
        desired = self.store.desired_states()
        log.info("board reset (%s): relays are OFF, restoring %d desired state(s)", line, len(desired))
        self.resync = deque(desired.items())
        if self.inflight and self.inflight.command_id is None:
            self.inflight = None
        elif self.inflight:
            self.inflight.written_at = 0.0   # the reset ate it: write it again after the resync

    def _on_reply(self, ok: bool, msg) -> None:
        flight = self.inflight
        if flight is None:
            log.warning("board reply with no command waiting: %s", msg.line)
            self._count_bad("unexpected_reply", msg.line)
            return
        if ok and (msg.actuator, msg.state) != (flight.actuator, flight.state):
            log.warning("board confirmed %s %s while %s %s was waiting; ignoring it",
                        msg.actuator, msg.state, flight.actuator, flight.state)
            self._count_bad("unexpected_reply", msg.line)
            return
        self.inflight = None
        if flight.command_id is None:
            if not ok:
                log.error("board refused restoring %s %s: %s", flight.actuator, flight.state, msg.line)
            return
        self.store.finish_command(flight.command_id, ok, reason=None if ok else msg.line,
                                  response={"actuator": flight.actuator, "state": flight.state,
                                            "board": msg.line},
                                  desired=(flight.actuator, flight.state) if ok else None)
        log.info("command %s %s: %s", flight.command_id, "completed" if ok else "failed", msg.line)
        self.notify("acks")

    def _drive_commands(self, link: serial.Serial, now: float) -> None:
        flight = self.inflight
        if flight is not None:
            if flight.written_at and now - flight.written_at < self.ACK_TIMEOUT:
                return
            if flight.written_at and flight.attempts >= self.ACK_ATTEMPTS:
                self.inflight = None
                reason = f"no reply from the board after {flight.attempts} attempts"
                if flight.command_id:
                    self.store.finish_command(flight.command_id, False, reason=reason)
                    log.warning("command %s failed: %s", flight.command_id, reason)
                    self.notify("acks")
                else:
                    log.warning("restoring %s %s: %s", flight.actuator, flight.state, reason)
                return
            flight.attempts += 1
            flight.written_at = now
            self._write(link, protocol.encode_command(flight.actuator, flight.state))
            return
        if self.resync:
            actuator, state = self.resync.popleft()
            self.inflight = InFlight(actuator, state, None, now, 1)
            self._write(link, protocol.encode_command(actuator, state))
            return
        if now < self._next_ledger:
            return
        self._next_ledger = now + self.LEDGER_POLL
        version = self.store.data_version()
        if version == self._data_version:
            return
        cmd = self.store.next_board_command()
        if cmd is None:
            self._data_version = version     # nothing new until another process commits
            return
        params = json.loads(cmd.parameters or "{}")
        expires = cmd.expires_at
        if expires is not None and expires < utcnow():
            self.store.finish_command(cmd.command_id, False, reason="expired before it reached the board")
            self.notify("acks")
            return
        try:
            line = protocol.encode_command(params.get("actuator"), params.get("state"))
        except ValueError as exc:
            self.store.finish_command(cmd.command_id, False, reason=f"malformed: {exc}")
            self.notify("acks")
            return
        attempts = self.store.start_command(cmd.command_id)
        payload = json.loads(line)
        self.inflight = InFlight(payload["actuator"], payload["state"], cmd.command_id, now, attempts)
        self._write(link, line)

    # -- periodic -----------------------------------------------------------------------
    def housekeeping(self) -> None:
        now = time.monotonic()
        if now - self._last_housekeeping < 5.0:
            return
        self._last_housekeeping = now
        if self.unstored:
            self._flush_unstored()
        if now - self._last_budget >= self.BUDGET_EVERY:
            self._last_budget = now
            self._check_budget()
        events = self.engine.check_stale()
        if events:
            self.store.add_alerts(events)
            for e in events:
                log.warning("alert %s: %s", e.state, e.message)
            self.notify("alerts")
        self._flush_counts()
        self._reload_configuration()
        if now - self._last_summary >= self.SUMMARY_EVERY:
            bad = sum(self.bad_counts_total().values())
            stored, bad0 = self._summary_base
            log.info("last %.0f s: %d readings stored, %d bad lines; %d pending sync",
                     now - self._last_summary, self.stored_rows - stored, bad - bad0,
                     self.store.pending_count())
            self._summary_base = (self.stored_rows, bad)
            self._last_summary = now

    def _check_budget(self) -> None:
        """MAX_DB_MB: retention first; if what is left is all unsynced, say so loudly."""
        state = self.store.enforce_budget(self.settings.max_db_mb * 2**20,
                                          firebase_on=self.settings.firebase_enabled)
        if state["deleted"]:
            log.info("retention: deleted %d synced readings (store %.1f MB of %.0f MB)",
                     state["deleted"], state["used_mb"], state["max_mb"])
        if state["over"] == self._storage_over:
            return
        from mash.alerts import AlertEvent
        if state["over"]:
            message = (f"store {state['used_mb']:.0f} MB is over MAX_DB_MB={state['max_mb']:.0f} "
                       "with data not yet synced: nothing unsynced is deleted, recording goes on")
            log.error("%s", message)
            self.store.add_alerts([AlertEvent("storage_full", "CRITICAL", None, state["used_mb"],
                                              state["max_mb"], "raised", message)])
            self.notify("alerts")
        elif self._storage_over:
            log.info("store back under MAX_DB_MB (%.1f MB)", state["used_mb"])
            self.store.add_alerts([AlertEvent("storage_full", "CRITICAL", None, state["used_mb"],
                                              state["max_mb"], "cleared", "store back under its budget")])
            self.notify("alerts")
        self._storage_over = state["over"]

    def bad_counts_total(self) -> dict:
        self._flush_counts()
        return {k[len("bad_line."):]: v for k, v in self.store.counters().items()
                if k.startswith("bad_line.")}

    def _flush_counts(self) -> None:
        if not self.bad_counts:
            return
        counts, self.bad_counts = self.bad_counts, {}
        with self.store.transaction():
            for kind, n in counts.items():
                self.store.incr(f"bad_line.{kind}", n)

    def _reload_configuration(self) -> None:
        configured = self.store.meta_get("configuration")
        if configured == self._configured:
            return
        self._configured = configured
        if configured and configured.get("thresholds"):
            try:
                self.engine.thresholds = merge_thresholds(self.settings.thresholds,
                                                          configured["thresholds"], "CONFIGURE")
                log.info("alert thresholds updated by CONFIGURE")
            except ConfigError as exc:
                log.error("ignoring configured thresholds: %s", exc)


def main(settings: Settings | None = None) -> int:
    from mash.logs import setup_logging
    settings = settings or Settings.load()
    setup_logging(settings.log_level)
    import faulthandler
    faulthandler.register(signal.SIGUSR1, all_threads=True)   # kill -USR1: every thread's stack
    reader = Reader(settings)
    reader.install_signal_handlers()
    reader.run()
    return 0


if __name__ == "__main__":
    import sys
    from mash.cli import main as cli_main
    sys.exit(cli_main(["reader"]))
