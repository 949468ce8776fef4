"""The gateway's health figures for the status message (MQTT ``status``, Firebase
``metadata``, the dashboard): version, uptime, CPU temperature, CPU, disk and memory use, and
the Raspberry Pi's under-voltage flag. ``snapshot`` is the one place they are computed; the
only outside program it asks is ``vcgencmd`` (``throttled``), when it is installed."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import ifaddr              # zeroconf's dependency: the interfaces' addresses, no subprocess

from mash import __version__

UNDER_VOLTAGE_NOW = 0x1          # vcgencmd get_throttled: bit 0 under-voltage now
UNDER_VOLTAGE_SINCE_BOOT = 0x10000   # bit 16: has occurred since boot


def throttled() -> int | None:
    """``vcgencmd get_throttled`` as a number, or None without vcgencmd (not a Pi) or an
    answer it cannot read."""
    exe = shutil.which("vcgencmd")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "get_throttled"], capture_output=True, text=True,
                             timeout=2).stdout
        return int(out.strip().split("=", 1)[1], 16)
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def cpu_temperature(root: Path = Path("/")) -> float | None:
    """The first thermal zone's temperature, in C (the SoC's on a Pi), or None."""
    zones = sorted((root / "sys/class/thermal").glob("thermal_zone*/temp"))
    for zone in zones:
        raw = _read(zone)
        try:
            return round(int(raw) / 1000.0, 1)
        except (TypeError, ValueError):
            continue
    return None


def memory_used_pct(root: Path = Path("/")) -> float | None:
    """(MemTotal - MemAvailable) / MemTotal from ``/proc/meminfo``, in %."""
    info = {}
    for line in (_read(root / "proc/meminfo") or "").splitlines():
        key, _, rest = line.partition(":")
        try:
            info[key] = int(rest.split()[0])
        except (IndexError, ValueError):
            continue
    total, available = info.get("MemTotal"), info.get("MemAvailable")
    if not total or available is None:
        return None
    return round(100.0 * (total - available) / total, 1)


def system_uptime_s(root: Path = Path("/")) -> float | None:
    try:
        return round(float((_read(root / "proc/uptime") or "").split()[0]), 0)
    except (IndexError, ValueError):
        return None


def snapshot(data_dir: Path, started: float, now: float | None = None,
             root: Path = Path("/"), throttled_flags: int | None = None) -> dict:
    """The health figures: ``version``, ``uptime_s`` (this process, since ``started``, an
    epoch time), ``system_uptime_s``, ``cpu_temp_c``, ``cpu_pct`` (1-minute load over the
    cores), ``memory_used_pct``, ``disk_used_pct`` (of the store's file system) and
    ``under_voltage`` (True/False from ``throttled_flags``; None when they are not known).
    A figure this machine does not have is None; nothing here raises."""
    now = time.time() if now is None else now
    try:
        disk = shutil.disk_usage(data_dir if Path(data_dir).exists() else Path(data_dir).parent)
        disk_pct = round(100.0 * disk.used / disk.total, 1) if disk.total else None
    except OSError:
        disk_pct = None
    try:
        cpu_pct = round(100.0 * os.getloadavg()[0] / (os.cpu_count() or 1), 1)
    except OSError:
        cpu_pct = None
    return {
        "version": __version__,
        "uptime_s": round(max(0.0, now - started), 0),
        "system_uptime_s": system_uptime_s(root),
        "cpu_temp_c": cpu_temperature(root),
        "cpu_pct": cpu_pct,
        "memory_used_pct": memory_used_pct(root),
        "disk_used_pct": disk_pct,
        "under_voltage": (None if throttled_flags is None else
                          bool(throttled_flags & (UNDER_VOLTAGE_NOW | UNDER_VOLTAGE_SINCE_BOOT))),
    }


def network_identity(host: str | None, root: Path = Path("/")) -> tuple[str | None, str | None]:
    """``(ip, mac)`` of the interface this machine reaches ``host`` through: the kernel's
    route lookup (a UDP socket "connected" to it sends nothing) and the interface's address
    from ``/sys/class/net``. None for what cannot be found (no route, no such file)."""
    if not host:
        return None, None
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))
            ip = s.getsockname()[0]
    except OSError:
        return None, None
    mac = None
    for adapter in ifaddr.get_adapters():
        if any((a.ip[0] if isinstance(a.ip, tuple) else a.ip) == ip for a in adapter.ips):
            raw = _read(root / "sys/class/net" / adapter.name / "address")
            mac = raw.strip().upper() if raw and raw.strip() not in ("", "00:00:00:00:00:00") else None
            break
    return ip, mac
