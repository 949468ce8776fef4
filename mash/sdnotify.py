"""systemd's notify protocol (sd_notify(3)) in a few lines: ``READY=1`` once a process is
really up, ``WATCHDOG=1`` from the loop whose hang matters, ``STOPPING=1`` on a clean stop.

Each is one datagram to the unix socket in ``$NOTIFY_SOCKET`` (``@name``: the abstract
namespace); without it (not run by a ``Type=notify`` unit) every call is a no-op. The units'
``WatchdogSec=`` reaches the process as ``$WATCHDOG_USEC``; a loop that stops calling
``Watchdog.ping`` for that long is killed and restarted by systemd.
"""
from __future__ import annotations

import os
import socket
import threading
import time

_ready = threading.Event()      # READY=1 told: watchdog pings only after it, never before


def notify(state: str) -> bool:
    """Send ``state`` (``"READY=1"``, ...) to systemd; False when there is no one to tell."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True


def ready() -> bool:
    told = notify("READY=1")
    _ready.set()
    return told


def stopping() -> bool:
    return notify("STOPPING=1")


class Watchdog:
    """``ping()`` from a loop as often as it likes: ``WATCHDOG=1`` goes at most every half
    of ``$WATCHDOG_USEC`` (what sd_watchdog_enabled(3) advises); nothing without one."""

    def __init__(self, env=os.environ, clock=time.monotonic):
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        mine = not pid or pid == str(os.getpid())
        self.every = int(usec) / 2e6 if usec and usec.isdigit() and mine else None
        self.clock = clock
        self._next = 0.0

    @property
    def enabled(self) -> bool:
        return self.every is not None

    def ping(self) -> None:
        """A loop that runs before the process said READY (the worker's scheduler starts
        inside its start-up) pings nothing yet: systemd hears READY first."""
        if self.every is None or not _ready.is_set():
            return
        now = self.clock()
        if now >= self._next:
            self._next = now + self.every
            notify("WATCHDOG=1")
