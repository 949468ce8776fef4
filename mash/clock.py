"""Wall-clock helpers in the one format every store column and wire message uses.

Timestamps are naive UTC in the store and ISO 8601 with milliseconds and ``Z`` on the wire
(the backend's format).
"""
from __future__ import annotations

import ctypes
import datetime as dt
import os
import time
from pathlib import Path


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


# -- the clock's own health --------------------------------------------------------------------
# A Pi has no RTC: it boots with the time it saved at shutdown (fake-hwclock) or 1970, and the
# wall clock jumps when NTP first answers. Until then, readings are stamped from the
# boot-relative clock and rebased (mash.timekeeper).
TIMESYNC_FLAG = "/run/systemd/timesync/synchronized"
BOOT_ID = "/proc/sys/kernel/random/boot_id"
_STA_UNSYNC = 0x0040
BOOTTIME = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)        # this process's own C library
    except OSError:
        return None


_LIBC = _libc()


def kernel_synchronized() -> bool:
    """The kernel's NTP status (what ``timedatectl`` calls "System clock synchronized"):
    ``adjtimex`` without STA_UNSYNC. Set by systemd-timesyncd, chrony and ntpd alike."""
    if _LIBC is None or not hasattr(_LIBC, "adjtimex"):
        return False
    buf = ctypes.create_string_buffer(512)               # struct timex, with room to spare
    try:
        if _LIBC.adjtimex(buf) < 0:
            return False
    except (OSError, ValueError):
        return False
    # modes (int, padded to a long), then offset, freq, maxerror, esterror (longs), status (int)
    status = ctypes.c_int.from_buffer(buf, ctypes.sizeof(ctypes.c_long) * 5).value
    return not status & _STA_UNSYNC


class ClockSource:
    """Where time comes from: the wall clock, ``CLOCK_BOOTTIME`` (never jumps, counts
    suspend), this boot's id, and whether the wall clock is synchronized. Tests pass their
    own source; nothing else reads these directly.

    ``trust``: the wall clock is right from boot (``CLOCK_SYNC=trust``: a battery-backed
    RTC, or a host that keeps the time)."""

    def __init__(self, trust: bool = False, flag: str = TIMESYNC_FLAG):
        self.trust = trust
        self.flag = flag
        self._boot_id: str | None = None

    def wall(self) -> float:
        return time.time()

    def boottime(self) -> float:
        return time.clock_gettime(BOOTTIME)

    def boot_id(self) -> str:
        if self._boot_id is None:
            try:
                self._boot_id = Path(BOOT_ID).read_text().strip()
            except OSError:             # not Linux: one id per process start
                self._boot_id = f"process-{os.getpid()}-{time.time():.0f}"
        return self._boot_id

    def synchronized(self) -> str | None:
        """How the wall clock is known to be right (``"trusted"``, ``"timesyncd"``,
        ``"kernel"``), or None."""
        if self.trust:
            return "trusted"
        if os.path.exists(self.flag):
            return "timesyncd"
        if kernel_synchronized():
            return "kernel"
        return None
