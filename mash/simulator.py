"""A simulated MASH board on a pseudo-terminal, behaving like firmware v1.0 (CONTRACT §1).

Used by ``mash run`` when no Arduino is attached, by ``mash simulate``, and by the tests as
the far end of a real serial link. With ``link`` it keeps a symlink to the current pty, like
udev's ``/dev/serial/by-id`` names, so ``unplug()``/``replug()`` can move the device the way a
USB cable does while the reader keeps its configured path.
"""
from __future__ import annotations

import json
import logging
import os
import random
import select
import termios
import threading
import time
import tty
from pathlib import Path

from mash.chamber import Chamber, SimClock
from mash.contract import ACTUATORS, KEEPALIVE
from mash.protocol import encode_reading

log = logging.getLogger(__name__)

# A pty has no DTR line, so "opening the port resets the board" is detected through termios:
# the slave is left at this speed, the gateway's open sets its own baud rate, and the board
# sees the change, boots (banner, relays OFF) and marks the line again.
_IDLE_SPEED = termios.B38400
BOOT_TIME = 0.3

BANNER = [
    "==================================================",
    "  M.A.S.H. IoT - Arduino Firmware v1.0",
    "==================================================",
    "[OK] SCD41 sensors initialized",
    "[SAFETY] All actuators OFF",
    "[READY] System ready. Waiting for commands...",
]


class SimulatedBoard:
    def __init__(self, interval: float = 5.0, link: str | os.PathLike | None = None,
                 watchdog_after: float = 60.0, seed: int | None = None,
                 chamber: Chamber | None = None, clock: SimClock | None = None):
        self.interval = interval
        self.link = Path(link) if link else None
        self.watchdog_after = watchdog_after
        self.rng = random.Random(seed)
        self.actuators = {name: "OFF" for name in ACTUATORS}
        # With a chamber, readings come from its physics, which answers the relays, on
        # ``clock`` (simulated seconds); ``switches`` logs (sim time, actuator, state).
        self.chamber = chamber
        self.clock = clock or SimClock()
        self._sim_at = self.clock.now()
        self.switches: list[tuple[float, str, str]] = []
        self.received: list[bytes] = []          # every line the gateway wrote, in order
        self.sent_readings = 0
        self.boots = 0                           # banners printed (power-on, resets, opens)
        self.dropped = 0
        self.invalid_rooms: set[str] = set()
        self.refuse_next: str | None = None      # answer the next command with this line
        self.mute_next = 0                       # swallow this many commands without a reply
        self.reply_delay = 0.0                   # s the loop blocks before a [CMD] reply (I2C)
        self.paused = False                      # no readings while set (commands still answered)
        self._values = {"fruiting": [24.0, 85.0, 800.0], "spawning": [28.0, 72.0, 3000.0]}
        self._lock = threading.Lock()            # guards the fds
        self._write_lock = threading.Lock()      # one line at a time, like the firmware's loop
        self._stop = threading.Event()
        self._master = self._slave = None
        self._thread = None
        self._last_input = time.monotonic()
        self._watchdog_tripped = False
        self._plugged = threading.Event()

    # -- lifecycle ----------------------------------------------------------------------
    @property
    def port(self) -> str:
        return str(self.link) if self.link else os.ttyname(self._slave)

    def start(self, banner: bool = True) -> "SimulatedBoard":
        self._open_pty()
        if banner:
            self._banner()
        self._thread = threading.Thread(target=self._run, name="simulated-board", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        self._close_pty()
        if self.link and self.link.is_symlink():
            self.link.unlink()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _open_pty(self) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)          # no echo, no newline translation: a plain byte pipe
        self._mark_idle(slave)
        os.set_blocking(master, False)
        with self._lock:
            self._master, self._slave = master, slave
        if self.link:
            tmp = self.link.with_name(self.link.name + ".new")
            if tmp.is_symlink() or tmp.exists():
                tmp.unlink()
            tmp.symlink_to(os.ttyname(slave))
            os.replace(tmp, self.link)
        self._plugged.set()

    @staticmethod
    def _mark_idle(fd) -> None:
        attrs = termios.tcgetattr(fd)
        attrs[4] = attrs[5] = _IDLE_SPEED
        termios.tcsetattr(fd, termios.TCSANOW, attrs)

    def _opened_by_host(self) -> bool:
        """True once each time the gateway opens (and so reconfigures) the port."""
        with self._lock:
            fd = self._slave
            if fd is None:
                return False
            try:
                if termios.tcgetattr(fd)[4] == _IDLE_SPEED:
                    return False
                self._mark_idle(fd)
            except termios.error:
                return False
        return True

    def _boot_if_opened(self, boot_at: float | None) -> float | None:
        """DTR reset: opened by the host, the board reboots (relays OFF, banner after
        BOOT_TIME); returns when the boot ends, or ``boot_at`` unchanged."""
        if not self._opened_by_host():
            return boot_at
        self._all_off()
        return time.monotonic() + BOOT_TIME

    def _close_pty(self) -> None:
        self._plugged.clear()
        with self._lock:
            for fd in (self._master, self._slave):
                if fd is not None:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            self._master = self._slave = None

    # -- faults ---------------------------------------------------------------------------
    def unplug(self) -> None:
        """The USB cable comes out: the reader's next read fails and the device path is gone."""
        self._close_pty()
        if self.link and self.link.is_symlink():
            self.link.unlink()

    def replug(self, banner: bool = True) -> None:
        """Plugged back in: a new tty under the same link, and the board boots (relays OFF)."""
        self._open_pty()
        self._all_off()
        if banner:
            self._banner()

    def reset(self) -> None:
        """The board reboots (brown-out, watchdog, reset button): banner, every relay OFF."""
        self._all_off()
        self._banner()

    def inject(self, raw: bytes) -> None:
        """Put raw bytes on the line, exactly as given."""
        self._write(raw)

    def inject_garbage(self, n: int = 1) -> None:
        for _ in range(n):
            junk = bytes(self.rng.randrange(256) for _ in range(self.rng.randrange(1, 80)))
            self._write(junk.replace(b"\n", b"") + b"\n")

    def inject_truncated(self) -> None:
        line = encode_reading(self._reading())
        self._write(line[: len(line) // 2] + b"\n")

    def set_invalid(self, room: str, invalid: bool = True) -> None:
        (self.invalid_rooms.add if invalid else self.invalid_rooms.discard)(room)

    # -- behaviour ------------------------------------------------------------------------
    def _set(self, actuator: str, state: str) -> None:
        """Switch one relay (the chamber's physics up to now ran with it as it was)."""
        if self.actuators.get(actuator) == state:
            return
        self._advance()
        self.actuators[actuator] = state
        self.switches.append((self.clock.now(), actuator, state))

    def _all_off(self) -> None:
        for name in ACTUATORS:
            self._set(name, "OFF")

    def _advance(self) -> None:
        if self.chamber is not None:
            now = self.clock.now()
            self.chamber.step(now - self._sim_at, dict(self.actuators))
            self._sim_at = now

    def _banner(self) -> None:
        # counted before it is written: whoever reads the banner then finds it counted
        self.boots += 1
        self._write("".join(line + "\r\n" for line in BANNER).encode())

    def _drift(self) -> None:
        for room, vals in self._values.items():
            vals[0] = min(max(vals[0] + self.rng.uniform(-0.2, 0.2), 18.0), 32.0)
            vals[1] = min(max(vals[1] + self.rng.uniform(-0.8, 0.8), 55.0), 98.0)
            vals[2] = min(max(vals[2] + self.rng.uniform(-25, 25), 420.0), 4800.0)

    def _reading(self) -> dict:
        if self.chamber is not None:
            self._advance()
            out = self.chamber.reading()
            for room in self.invalid_rooms:
                out[room] = {"error": "invalid_reading"}
            return out
        self._drift()
        out = {}
        for room, (t, h, c) in self._values.items():
            if room in self.invalid_rooms:
                out[room] = {"error": "invalid_reading"}
            else:
                out[room] = {"temp": round(t, 1), "humidity": round(h, 1), "co2": int(c)}
        return out

    def set_values(self, room: str, temp: float | None = None, humidity: float | None = None,
                   co2: float | None = None) -> None:
        """What the room's sensor reads from now on (without a chamber): a test turns the
        CO2 up, say."""
        values = self._values[room]
        for i, v in enumerate((temp, humidity, co2)):
            if v is not None:
                values[i] = float(v)

    def emit_reading(self, rooms: dict | None = None) -> None:
        self._write(encode_reading(rooms if rooms is not None else self._reading()))
        self.sent_readings += 1

    def _write(self, data: bytes, wait: float = 2.0) -> bool:
        """Write to the line; a full buffer (nobody reading) drops the bytes, as a UART would."""
        with self._write_lock:
            return self._write_locked(data, wait)

    def _write_locked(self, data: bytes, wait: float) -> bool:
        deadline = time.monotonic() + wait
        view = memoryview(data)
        while view:
            with self._lock:
                fd = self._master
                if fd is None:
                    self.dropped += 1
                    return False
                try:
                    n = os.write(fd, view)
                    view = view[n:]
                    continue
                except BlockingIOError:
                    pass
                except OSError:
                    self.dropped += 1
                    return False
            if time.monotonic() > deadline:
                self.dropped += 1
                return False
            time.sleep(0.002)
        return True

    def _handle(self, line: bytes) -> None:
        line = line.strip(b"\r")
        if not line:
            return
        self.received.append(line)
        self._last_input = time.monotonic()
        if self._watchdog_tripped:
            self._watchdog_tripped = False
            self._write(b'{"watchdog":"recovered"}\r\n')
        if line + b"\n" == KEEPALIVE:
            return
        try:
            cmd = json.loads(line)
        except ValueError as exc:
            self._write(f"[ERROR] deserializeJson() failed: InvalidInput ({exc.msg})\r\n".encode())
            return
        if not isinstance(cmd, dict) or "actuator" not in cmd or "state" not in cmd:
            self._write(b"[ERROR] Invalid JSON command format. Missing 'actuator' or 'state'.\r\n")
            return
        if self.mute_next > 0:
            self.mute_next -= 1
            return
        if self.refuse_next:
            line, self.refuse_next = self.refuse_next, None
            self._write(line.encode() + b"\r\n")
            return
        actuator, state = str(cmd["actuator"]), str(cmd["state"])
        if actuator not in self.actuators:
            self._write(f"[ERROR] Unknown actuator: {actuator}\r\n".encode())
            return
        state = "ON" if state == "ON" else "OFF"
        if self.reply_delay:
            time.sleep(self.reply_delay)          # the firmware's loop is blocked meanwhile
        self._set(actuator, state)
        self._write(f"[CMD] Set {actuator} to {state}\r\n".encode())

    def _run(self) -> None:
        buf = b""
        next_reading = time.monotonic() + (self.interval if self.interval > 0 else 3600)
        boot_at = None
        while not self._stop.is_set():
            boot_at = self._boot_if_opened(boot_at)
            if boot_at and time.monotonic() >= boot_at:
                boot_at = None
                self._banner()
            if not self._plugged.wait(0.05):
                buf = b""
                continue
            with self._lock:
                fd = self._master
            if fd is None:
                continue
            now = time.monotonic()
            timeout = max(0.0, min(next_reading - now, 0.05))
            try:
                ready, _, _ = select.select([fd], [], [], timeout)
            except (OSError, ValueError):
                continue
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except (BlockingIOError, OSError):
                    chunk = b""
                boot_at = self._boot_if_opened(boot_at)   # opened since the loop's top
                if boot_at is not None:
                    chunk = buf = b""   # the bootloader runs: no sketch reads the line yet
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    self._handle(line)
                buf = buf[-256:]        # the firmware's buffer is small; noise is dropped
            now = time.monotonic()
            if self.interval > 0 and not self.paused and now >= next_reading:
                self.emit_reading()
                next_reading = now + self.interval
            if (not self._watchdog_tripped and self.watchdog_after
                    and now - self._last_input > self.watchdog_after):
                self._watchdog_tripped = True
                self._all_off()
                self._write(f"[WATCHDOG] No serial data for {int(self.watchdog_after)}s "
                            "(RPi keepalive missing)\r\n".encode())


def main(interval: float = 5.0, link: str | None = None) -> None:
    """``mash simulate``: run a board until Ctrl-C, printing where to point SERIAL_PORT."""
    board = SimulatedBoard(interval=interval, link=link, chamber=Chamber()).start()
    print(f"simulated MASH board on {board.port} (a reading every {interval:g} s); Ctrl-C stops. "
          f"Point the reader at it with SERIAL_PORT={board.port} MASH_SIMULATED_BOARD=1, so its "
          "readings are marked as simulated and kept local", flush=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        board.stop()
