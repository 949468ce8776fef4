"""The serial reader service: the only process that touches the serial port.

It reads lines from the board, stores good readings (both rooms of a line in one statement),
counts bad lines, raises threshold alerts, keeps the board's watchdog fed, and hands the
command lines to the board-command driver (``mash.board``). It never talks to the cloud and
never touches the queue: what it stores (readings, alerts, command outcomes) the worker sees
through SQLite. Its periodic chores are in ``mash.housekeeping``.
"""
from __future__ import annotations

import contextlib
import logging
import select
import signal
import sys
import threading
import time
from collections import deque

import serial
from peewee import DatabaseError
from serial import SerialException
from serial.tools import list_ports

from mash import protocol, sdnotify
from mash.alerts import AlertEngine
from mash.board import BoardCommands
from mash.chamber import Chamber
from mash.clock import ClockSource, iso, utcnow
from mash.config import Settings
from mash.contract import KEEPALIVE
from mash.climate import ClimateLoop
from mash.control import ClimateController
from mash.housekeeping import Housekeeping
from mash.logs import OncePerKind, start_process
from mash.models import Store
from mash.simulator import SimulatedBoard
from mash.timekeeper import Timekeeper

log = logging.getLogger("mash.reader")

# USB vendors auto-detect may open, in order of preference: the Arduino boards' own, then
# the USB-serial chips of the clones MASH boards are built on (the MASH firmware docs name
# CH340 and FTDI). Anything else (a GPS, a modem, a Zigbee stick, CP210x bridges) is opened
# only when SERIAL_PORT names it: keepalives and relay commands are not for other devices.
BOARD_VENDORS = {0x2341: "Arduino", 0x2A03: "Arduino (arduino.org)",
                 0x1A86: "CH340 (QinHeng)", 0x0403: "FTDI"}


def pick_board(ports) -> str | None:
    """From ``list_ports.comports()``-style port infos, the device auto-detect may open:
    the first (by path) of the most preferred vendor in BOARD_VENDORS; a port with no
    USB vendor (a built-in UART, a pty) never."""
    known = [p for p in ports if p.vid in BOARD_VENDORS]
    rank = list(BOARD_VENDORS)
    known.sort(key=lambda p: (rank.index(p.vid), p.device))
    return known[0].device if known else None


def find_board() -> str | None:
    """The attached MASH board's port (``pick_board``), or None."""
    return pick_board(list_ports.comports())


class Reader:
    KEEPALIVE_EVERY = 15.0
    SILENCE = 30.0
    RECONNECT_MAX = 2.0
    UNSTORED_MAX = 50_000   # held writes (reading lines and the rest): days at the board's rate
    BEAT_EVERY = 60.0       # s between heartbeat rows (mash status, mash doctor)
    IDLE_WAIT = 1.0         # wall s between chores when the board says nothing (with hints)

    def __init__(self, settings: Settings, store: Store | None = None, clock=time.monotonic,
                 wallclock=None, clock_source: ClockSource | None = None,
                 idle_wait: float | None = None):
        """``clock``/``wallclock``: the controller's clocks (a test's may run faster than
        the wall; it then passes an ``idle_wait`` as short as the controller needs)."""
        self.settings = settings
        self.store = store or Store(settings.db_path)
        # woken by other processes' commits (a command for the board) instead of polling
        self.hint = self.store.listen()
        self.idle_wait = self.IDLE_WAIT if idle_wait is None else idle_wait
        self.stop_event = threading.Event()
        self.engine = AlertEngine(settings.thresholds, settings.stale_after,
                                  active=self.store.active_alert_keys(), clock=clock)
        self.controller = ClimateController(settings.control_rules, settings.control_mode,
                                            override_s=settings.override_minutes * 60,
                                            stale_after=settings.stale_after, clock=clock,
                                            wallclock=wallclock)
        self.housekeeping = Housekeeping(settings, self.store, self.engine, self.controller,
                                         add_alerts=self._keep_alerts)
        self.bad = OncePerKind(log, "bad line from board")
        self.bad_counts: dict[str, int] = {}
        self.climate = ClimateLoop(self.controller, self.store)
        self.board = BoardCommands(self.store, self._count_bad, on_settled=self.climate.settled,
                                   restorable=self.climate.restorable, record=self._keep,
                                   holding=lambda: self.held_kinds.get("command", 0) > 0)
        self.climate.board = self.board
        self.timekeeper = Timekeeper(self.store, clock_source or ClockSource(
            trust=settings.clock_sync == "trust"))
        self.stored_rows = 0
        self.connected_port: str | None = None
        self.connections = 0
        # every write not yet in the store, oldest first: (kind, write(), alert events)
        self.unstored: deque = deque()
        self.held_kinds: dict[str, int] = {}
        self.dropped = 0              # held writes dropped at UNSTORED_MAX (counted, logged)
        self._dropped_recorded = 0
        self.store_error: str | None = None
        self.clean_stop = False
        self.watchdog = sdnotify.Watchdog()
        self._failed_kinds: set[str] = set()
        self._sim = None
        # a simulated board (ours, or the one `mash run` passed): its readings are marked,
        # and kept from every sink unless SIM_SYNC=1
        self.simulated = settings.serial_port == "sim" or settings.simulated_board
        self.board_state = {"connected": False, "since": iso(utcnow()), "port": None,
                            "problem": "not opened yet"}
        self._next_beat = 0.0

    # -- lifecycle ----------------------------------------------------------------------
    def stop(self, *_):
        self.stop_event.set()
        if self.hint is not None:
            self.hint.interrupt()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def _port(self) -> str | None:
        port = self.settings.serial_port
        if port == "sim":
            if self._sim is None:
                self._sim = SimulatedBoard(interval=5.0, chamber=Chamber()).start()
                log.info("no board configured: using the simulated board on %s", self._sim.port)
            return self._sim.port
        return port or find_board()

    def run(self) -> None:
        """Open the board, read until it goes away, reopen: forever, until stopped."""
        delay, last_problem = 0.25, None
        sdnotify.ready()
        try:
            while not self.stop_event.is_set():
                self.watchdog.ping()
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
                        self._board_changed(False, problem=problem)
                    with self._guard(link_open=False):
                        self.chores()
                    self.stop_event.wait(delay)
                    delay = min(delay * 2, self.RECONNECT_MAX)
                    continue
                delay, last_problem = 0.25, None
                self.connected_port = port
                self.connections += 1
                log.info("board connected on %s", port)
                self._board_changed(True, port=port)
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
                    self._board_changed(False, problem=why)
        finally:
            if self.stop_event.is_set():
                sdnotify.stopping()
            self.flush_counts()
            self.board_state = {**self.board_state, "connected": False}
            self._beat(stopped=True)
            if self.hint is not None:
                self.hint.close()
                self.hint = None
            if self._sim:
                self._sim.stop()
            if self.unstored:
                log.error("reader stopped with %d held writes NOT written (%s): the store "
                          "refused them (%s)", len(self.unstored),
                          ", ".join(f"{n} {k}" for k, n in sorted(self.held_kinds.items()) if n),
                          self.store_error)
            else:
                self.clean_stop = True
                log.info("reader stopped")

    @contextlib.contextmanager
    def _guard(self, link_open: bool = True):
        """One loop step: whatever fails in it (the store, a bug) is logged, once per kind,
        and the loop goes on; what the step meant to write is held (``_keep``). With a link
        open, a serial error passes: it ends the connection, which is then
        reopened."""
        try:
            yield
        except DatabaseError as exc:
            if self.store_error is None:
                log.error("store error (%s): the reader goes on, holding what it cannot write", exc)
            self.store_error = str(exc)
        except Exception as exc:               # a bug, a file error: logged with its stack, once
            if link_open and isinstance(exc, (SerialException, OSError)):
                raise
            kind = f"{type(exc).__name__}:{exc}"[:200]
            if kind not in self._failed_kinds:
                self._failed_kinds.add(kind)
                log.exception("reader loop step failed; going on")

    # -- one connection -----------------------------------------------------------------
    def _session(self, link: serial.Serial) -> str | None:
        buf = bytearray()
        discarding = False
        now = time.monotonic()
        self.last_line = self.last_write = now
        self.board.on_reconnect()
        write = lambda data: self._write(link, data)  # noqa: E731
        try:
            # No reset_input_buffer(): what the board said while we were away (a banner
            # after a replug, readings during a restart) is real and is read, not dropped.
            poller = select.poll()
            poller.register(link.fileno(), select.POLLIN)
            if self.hint is not None:
                poller.register(self.hint.fileno(), select.POLLIN)
            while not self.stop_event.is_set():
                self.watchdog.ping()
                chunk = self._read(link, poller)
                now = time.monotonic()
                with self._guard():
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
                            self.handle_line(line, write)
                        if len(buf) > protocol.MAX_LINE:
                            if not discarding:      # one count a line, however many reads it spans
                                self._count_bad("too_long", f"more than {protocol.MAX_LINE} bytes without a newline")
                            buf.clear()
                            discarding = True
                if now - self.last_line > self.SILENCE:
                    return f"no line for {self.SILENCE:.0f} s"
                with self._guard():                  # disk full, locked: the serial side goes on
                    self.climate.tick(write)
                    self.board.drive(write, now)
                    self.chores()
                if now - self.last_write >= self.KEEPALIVE_EVERY:
                    self._write(link, KEEPALIVE)
        except (serial.SerialException, OSError) as exc:
            return str(exc) or exc.__class__.__name__
        return None

    def _read(self, link: serial.Serial, poller) -> bytes:
        """What the board sent, after waiting for it up to ``idle_wait`` (less while a command
        is under way: ``BoardCommands.next_look``; the port's 0.1 s timeout when there are no
        hints to wake us). A hint (another process committed: maybe a command for the board)
        ends the wait early."""
        if self.hint is None:
            return link.read(link.in_waiting or 1)          # the port's own 0.1 s timeout
        wait = self.board.next_look(time.monotonic(), self.idle_wait)
        ready = dict(poller.poll(int(wait * 1000)))
        if self.hint.fileno() in ready and self.hint.drain():
            self.board.hinted()
        if link.fileno() in ready:
            # readable with nothing to read is a hang-up: pyserial raises, the session ends
            return link.read(link.in_waiting or 1)
        return b""

    def _write(self, link: serial.Serial, data: bytes) -> None:
        link.write(data)
        link.flush()
        self.last_write = time.monotonic()

    # -- lines --------------------------------------------------------------------------
    def handle_line(self, raw: bytes, write=None) -> None:
        msg = protocol.parse_line(raw)
        if isinstance(msg, protocol.Reading):
            for room, kind in msg.rejected.items():
                self._count_bad(kind, f"{room}: {raw[:120]!r}")
            if msg.rooms:
                self._store_reading(msg)
                if write is not None:
                    self.climate.tick(write, now=True)     # a fresh reading: decide at once
        elif isinstance(msg, protocol.Bad):
            self._count_bad(msg.kind, msg.detail)
        elif isinstance(msg, protocol.Ack):
            self.board.on_reply(True, msg)
        elif isinstance(msg, protocol.CommandError):
            self.board.on_reply(False, msg)
        elif isinstance(msg, protocol.BoardReset):
            self.controller.board_reset()
            self.board.on_reset(msg.line)
        elif isinstance(msg, protocol.WatchdogRecovered):
            self.board.on_recovered(msg.line)
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
            self.controller.observe(r.room, r.temp, r.humidity, r.co2)
        sample = self.timekeeper.sample()
        self._keep("reading", lambda: self._write_reading(data, sample, events), events)
        if self.stored_rows == 0 and not self.unstored:
            log.info("readings flowing: first reading stored (%s)",
                     ", ".join(f"{r.room} {r.temp:g} C {r.humidity:g} % {r.co2} ppm" for r in msg.rooms))
        self.stored_rows += len(msg.rooms)

    def _write_reading(self, data: dict, sample, events) -> None:
        """One reading line with its alerts (inside ``_flush_unstored``'s transaction)."""
        ts, provisional = self.timekeeper.stamp(sample)
        self.store.save_sensor_data(data, timestamp=ts, provisional=provisional,
                                    simulated=self.simulated, sim_sync=self.settings.sim_sync)
        if events:
            self.store.add_alerts(events)

    def _keep(self, kind: str, write, events=()) -> None:
        """Every write of the reader (readings, counters, board replies, alerts, heartbeats)
        goes here: ``write()`` runs now if the store takes it, else it is held in memory,
        in order, and tried again at the next chores. At UNSTORED_MAX held the oldest is
        dropped, counted (``reader_dropped``) and logged."""
        if kind == "heartbeat" and self.held_kinds.get(kind):
            # only the latest heartbeat matters: the one held is replaced
            self.unstored = deque(h for h in self.unstored if h[0] != kind)
            self.held_kinds[kind] = 0
        if len(self.unstored) >= self.UNSTORED_MAX:
            self._flush_unstored()               # the store may take them again by now
        if len(self.unstored) >= self.UNSTORED_MAX:
            dropped_kind = self.unstored.popleft()[0]
            self.held_kinds[dropped_kind] -= 1
            if not self.dropped - self._dropped_recorded:
                log.error("%d writes held in memory, the most it keeps: dropping the oldest "
                          "(counted as reader_dropped) until the store takes writes again",
                          self.UNSTORED_MAX)
            self.dropped += 1
        self.unstored.append((kind, write, events))
        self.held_kinds[kind] = self.held_kinds.get(kind, 0) + 1
        self._flush_unstored()

    def _keep_alerts(self, events) -> None:
        self._keep("alert", lambda: self.store.add_alerts(events))

    def _flush_unstored(self) -> None:
        """Write held writes, oldest first, each in one transaction (a reading line with its
        alerts).

        A write that fails (disk full, database locked too long, a corrupt file being set
        aside) stays in memory and is tried again every few seconds; nothing is dropped
        until the bound (UNSTORED_MAX)."""
        while self.unstored:
            kind, write, events = self.unstored[0]
            cause = None
            try:
                with self.store.transaction():
                    try:
                        write()
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
            self.held_kinds[kind] -= 1
            for e in events:
                log.info("alert %s: %s (%s)", e.state, e.message, e.severity)
        if self.dropped > self._dropped_recorded:
            n, self._dropped_recorded = self.dropped - self._dropped_recorded, self.dropped
            self._keep("counter", lambda: self.store.incr("reader_dropped", n))
            log.error("store writable again: %d held writes had been dropped", n)
        if self.store_error is not None:
            log.info("store writable again: held writes written")
            self.store_error = None

    # -- periodic -----------------------------------------------------------------------
    def _board_changed(self, connected: bool, port: str | None = None,
                       problem: str | None = None) -> None:
        if connected != self.board_state["connected"] or problem != self.board_state["problem"]:
            since = iso(utcnow()) if connected != self.board_state["connected"] \
                else self.board_state["since"]
            self.board_state = {"connected": connected, "since": since, "port": port,
                                "problem": problem}
            self._beat(force=True)

    def _beat(self, force: bool = False, stopped: bool = False) -> None:
        """The reader's heartbeat row: alive, and whether the board is connected since when."""
        now = time.monotonic()
        if not (force or stopped) and now < self._next_beat:
            return
        self._next_beat = now + self.BEAT_EVERY
        board, extra = self.board_state, {"stopped": True} if stopped else {}
        self._keep("heartbeat", lambda: self.store.beat("reader", self.BEAT_EVERY, board=board,
                                                        **extra))

    def chores(self) -> None:
        self._beat()
        try:
            self.timekeeper.check()
        except DatabaseError as exc:          # the rebase is tried again next second
            log.debug("clock rebase deferred: %s", exc)
        now = time.monotonic()
        if not self.housekeeping.due(now):
            return
        if self.unstored:
            self._flush_unstored()
        self.flush_counts()
        self.housekeeping.run(now, self.stored_rows, sum(self.bad_counts_total().values()))

    def bad_counts_total(self) -> dict:
        self.flush_counts()
        return {k[len("bad_line."):]: v for k, v in self.store.counters().items()
                if k.startswith("bad_line.")}

    def flush_counts(self) -> None:
        if not self.bad_counts:
            return
        counts, self.bad_counts = self.bad_counts, {}

        def write():
            for kind, n in counts.items():
                self.store.incr(f"bad_line.{kind}", n)
        self._keep("counter", write)


def main(argv=None) -> int:
    """``python reader.py`` / ``mash reader``: the reader until SIGTERM or Ctrl-C."""
    settings = start_process()
    if settings is None:
        return 2
    reader = Reader(settings)
    reader.install_signal_handlers()
    reader.run()
    return 0 if reader.clean_stop else 1


if __name__ == "__main__":
    sys.exit(main())
