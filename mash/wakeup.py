"""Wake-up hints between the gateway's processes: a datagram that says "look again" and
carries no data. SQLite stays the only channel for data.

A writing ``Store`` sends one after each write (``Hints.notify``) to every listener of the same
store file. A listener is a unix datagram socket in the store's RAM directory, next to the queue
(``resolve_queue_dir``), at ``wake/<pid>-<n>.sock``. The reader waits on one beside the serial
port, and the worker's live feeds and scheduler each wait on their own, so an idle gateway
sleeps instead of polling ``data_version``.

A hint is best effort. A listener whose queue is full has hints waiting already, a dead
listener's file is removed by the next sender, and every waiter looks again after its own
fallback timeout anyway. A lost hint costs latency, never data.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import os
import select
import socket
from pathlib import Path

from mash.config import resolve_queue_dir, runtime_dir_from

log = logging.getLogger("mash.wakeup")

_numbers = itertools.count()


def directory_for(db_path) -> Path:
    """Where the hints of the store at ``db_path`` meet: every process derives the same RAM
    directory from the store's path alone (as the queue's), so no one configures it."""
    return resolve_queue_dir(Path(db_path).resolve().parent, None,
                             runtime_dir_from(os.environ)) / "wake"


class Hints:
    """The sending side: ``notify()`` after a commit, from any thread."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._sock: socket.socket | None = None

    def notify(self) -> int:
        """One datagram to each listener; returns how many took it. Never raises."""
        try:
            names = os.listdir(self.directory)
        except OSError:                      # no listener has ever bound here
            return 0
        sent = 0
        for name in names:
            if not name.endswith(".sock"):
                continue
            path = os.path.join(self.directory, name)
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    self._sock.setblocking(False)
                self._sock.sendto(b"!", path)
                sent += 1
            except BlockingIOError:          # its queue is full: it has hints waiting
                sent += 1
            except (ConnectionRefusedError, FileNotFoundError):
                with contextlib.suppress(OSError):   # its process is gone
                    os.unlink(path)
            except OSError as exc:
                log.debug("wake-up hint to %s not sent: %s", path, exc)
        return sent

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class Listener:
    """The receiving side: ``wait(timeout)`` until a hint, ``interrupt()`` or the timeout.
    One listener per waiting loop; ``close()`` removes its socket file."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = self.directory / f"{os.getpid()}-{next(_numbers)}.sock"
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()                # a file left by an earlier process of this pid
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.sock.bind(str(self.path))
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)
        self._poll = select.poll()
        self._poll.register(self.sock, select.POLLIN)

    def fileno(self) -> int:
        return self.sock.fileno()

    def wait(self, timeout: float | None) -> bool:
        """Block up to ``timeout`` seconds; True when hinted (every waiting hint is taken:
        many commits while we were busy wake us once)."""
        if not self._poll.poll(None if timeout is None else max(0, int(timeout * 1000))):
            return False
        return self.drain()

    def drain(self) -> bool:
        """Take every waiting hint without blocking; True when there was one."""
        got = False
        while True:
            try:
                self.sock.recv(64)
                got = True
            except (BlockingIOError, InterruptedError):
                return got
            except OSError:
                return got

    def interrupt(self) -> None:
        """Wake this listener's ``wait`` (its loop is stopping, or was asked to run now)."""
        with contextlib.suppress(OSError):
            self.sock.sendto(b"!", str(self.path))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._poll.unregister(self.sock)
        self.sock.close()
        with contextlib.suppress(OSError):
            self.path.unlink()


def listen(db_path) -> Listener | None:
    """A listener for the store at ``db_path``, or None when the directory cannot hold one
    (its path too long for a socket, not writable): the caller then polls as it would."""
    directory = directory_for(db_path)
    try:
        return Listener(directory)
    except OSError as exc:
        log.info("wake-up hints off (%s): polling the store instead", exc)
        return None
