"""``mash service install`` / ``uninstall``: systemd units for the reader, the worker and the
dashboard, pointing at this virtual environment, this checkout and its data directory.

The units run ``<this python> -m mash.<service>`` as the given user (the service's module
itself, not the whole ``mash`` command, so each process imports only what it uses), restart on failure, stop
on SIGTERM (each service finishes what it is doing), and share the queue in
``RuntimeDirectory=mash`` (``/run/mash``: RAM, made by systemd, kept while either runs). The
reader gets ``dialout`` as a supplementary group, and the user is checked for it too, since
``mash doctor`` and ``mash simulate`` open the port as that user.

Supervision (``mash.sdnotify``): ``Type=notify``, so a unit is "started" only once its process
says READY=1 (the reader before its first port open, the worker once its context and
scheduler run, the dashboard once it listens); ``WatchdogSec=`` with each process pinging
from the loop whose hang matters, so a hung one is killed and restarted like a crashed one.
``UMask=0077``: the store and its -wal/-shm are the service user's alone.

    mash service install --dry-run              # print the units
    sudo .venv/bin/mash service install --user pi
"""
from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from mash import releases
from mash.config import Settings, env_file_path, home

UNIT_DIR = Path("/etc/systemd/system")
SERIAL_GROUP = "dialout"


@dataclass
class Unit:
    name: str            # mash-reader
    description: str
    module: str          # run as ``python -m <module>``: the service's own imports only
    after: str = "local-fs.target"
    wants: str | None = None
    stop_timeout: int = 20
    serial: bool = False
    watchdog: int = 60      # s without a ping before systemd restarts the process
    kill_mode: str | None = None


UNITS = [
    Unit("mash-reader", "MASH gateway serial reader (the only owner of the board's port)",
         "mash.reader", serial=True),
    Unit("mash-worker", "MASH gateway worker (sync, MQTT, Firebase, commands)", "mash.worker",
         after="network-online.target", wants="network-online.target", stop_timeout=25,
         # an update or RESTART the worker started (``mash update``, its own session) must
         # outlive the worker it restarts: only the main process is stopped
         kill_mode="process"),
    Unit("mash-dashboard", "MASH gateway dashboard (the grower's page)", "mash.dashboard",
         stop_timeout=10),
]


def default_user() -> str:
    """Who the services run as: the user who ran ``sudo``, else the current user."""
    return os.environ.get("SUDO_USER") or pwd.getpwuid(os.getuid()).pw_name


def render(unit: Unit, user: str, python: str, workdir: Path, data_dir: Path,
           env_file: Path) -> str:
    group = grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name
    lines = [
        "[Unit]",
        f"Description={unit.description}",
        f"After={unit.after}",
        *([f"Wants={unit.wants}"] if unit.wants else []),
        "StartLimitIntervalSec=0",
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"WatchdogSec={unit.watchdog}",
        "UMask=0077",
        f"User={user}",
        f"Group={group}",
        *([f"SupplementaryGroups={SERIAL_GROUP}"] if unit.serial else []),
        f"WorkingDirectory={workdir}",
        f"Environment=MASH_HOME={workdir}",
        f"Environment=MASH_DATA_DIR={data_dir}",
        f"Environment=MASH_ENV_FILE={env_file}",
        "Environment=PYTHONUNBUFFERED=1",
        "# the checkout (WorkingDirectory) must not shadow the release's installed package",
        "Environment=PYTHONSAFEPATH=1",
        f"ExecStart={python} -m {unit.module}",
        "# always: `mash update` restarts a service by SIGTERM to its pid (no root needed),",
        "# and it comes back from whatever `current` points at",
        "Restart=always",
        "RestartSec=2",
        "KillSignal=SIGTERM",
        *([f"KillMode={unit.kill_mode}"] if unit.kill_mode else []),
        f"TimeoutStopSec={unit.stop_timeout}",
        "# the queue (nothing durable in it) in RAM, shared by the units: no SD-card writes",
        "RuntimeDirectory=mash",
        "RuntimeDirectoryPreserve=yes",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines)


BACKUP_UNIT = "mash-backup"


def backup_units(user: str, python: str, workdir: Path, data_dir: Path, env_file: Path,
                 directory: Path, keep: int) -> dict[str, str]:
    """``mash-backup.service`` (one backup into ``directory``, the newest ``keep`` kept) and
    ``mash-backup.timer`` (daily, caught up after a power cut: ``Persistent=true``)."""
    group = grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name
    service_text = "\n".join([
        "[Unit]",
        "Description=MASH gateway backup (the store, config/.env, the Firebase key)",
        f"RequiresMountsFor={directory}",
        "",
        "[Service]",
        "Type=oneshot",
        "UMask=0077",
        f"User={user}",
        f"Group={group}",
        f"WorkingDirectory={workdir}",
        f"Environment=MASH_HOME={workdir}",
        f"Environment=MASH_DATA_DIR={data_dir}",
        f"Environment=MASH_ENV_FILE={env_file}",
        "Environment=PYTHONSAFEPATH=1",
        f"ExecStart={python} -m mash backup -o {directory} --keep {keep}",
        "Nice=10",
        "IOSchedulingClass=idle",
        "",
    ])
    timer_text = "\n".join([
        "[Unit]",
        "Description=Daily MASH gateway backup",
        "",
        "[Timer]",
        "OnCalendar=daily",
        "RandomizedDelaySec=30min",
        "Persistent=true",
        f"Unit={BACKUP_UNIT}.service",
        "",
        "[Install]",
        "WantedBy=timers.target",
        "",
    ])
    return {f"{BACKUP_UNIT}.service": service_text, f"{BACKUP_UNIT}.timer": timer_text}


def units(user: str, python: str | None = None, workdir: Path | None = None,
          settings: Settings | None = None,
          backups: tuple[Path, int] | None = None) -> dict[str, str]:
    """``{file name: unit text}`` for this gateway: its ``MASH_HOME`` (``workdir``), data
    directory and ``.env`` as every command finds them (``mash.config.home``), wherever
    ``mash service install`` is run from."""
    settings = settings or Settings.load()
    workdir = (workdir or home()).resolve()
    data_dir = settings.data_dir if settings.data_dir.is_absolute() else workdir / settings.data_dir
    env_file = env_file_path() if workdir == home().resolve() else workdir / "config" / ".env"
    python = python or releases.python(workdir)
    made = {f"{u.name}.service": render(u, user, python, workdir, data_dir, env_file)
            for u in UNITS}
    if backups:
        made.update(backup_units(user, python, workdir, data_dir, env_file, *backups))
    return made


def serial_access(user: str) -> tuple[bool, str]:
    """Can ``user`` open the board's port? ``(ok, what to say)``."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return False, f"no user {user!r} on this machine"
    if entry.pw_uid == 0:
        return True, "root may open any port"
    try:
        group = grp.getgrnam(SERIAL_GROUP)
    except KeyError:
        return False, f"this system has no {SERIAL_GROUP!r} group: who owns /dev/ttyACM0?"
    if user in group.gr_mem or entry.pw_gid == group.gr_gid:
        return True, f"{user} is in {SERIAL_GROUP}"
    return False, (f"{user} is not in {SERIAL_GROUP}: run `sudo usermod -aG {SERIAL_GROUP} {user}`, "
                   "then log out and in again")


def in_virtualenv() -> bool:
    return sys.prefix != sys.base_prefix


def install(user: str, unit_dir: Path = UNIT_DIR, start: bool = True, out=sys.stdout,
            backups: tuple[Path, int] | None = None) -> int:
    """Write the units, reload systemd, enable and start them; returns an exit code."""
    try:
        rendered = units(user, backups=backups)
    except KeyError:
        print(f"no user {user!r} on this machine", file=out)
        return 2
    ok, why = serial_access(user)
    print(("✓ " if ok else "✗ ") + why, file=out)
    if not in_virtualenv():
        print(f"! {sys.executable} is not a virtual environment: the units will run the "
              "system Python (see the README's install command)", file=out)
    if unit_dir == UNIT_DIR and os.geteuid() != 0:
        print(f"writing to {unit_dir} needs root: run `sudo {sys.executable} -m mash service "
              f"install --user {user}`", file=out)
        return 1
    unit_dir.mkdir(parents=True, exist_ok=True)
    for name, text in rendered.items():
        (unit_dir / name).write_text(text)
        print(f"wrote {unit_dir / name}", file=out)
    if start:
        # the backup's service runs from its timer, never at boot by itself
        names = [n for n in rendered if n != f"{BACKUP_UNIT}.service"]
        for cmd in (["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", *names]):
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"`{' '.join(cmd)}` failed: {done.stderr.strip()}", file=out)
                return 1
        print(f"started {', '.join(names)}; `systemctl status mash-reader` and `mash doctor` "
              "tell how they are", file=out)
    return 0 if ok else 1


def uninstall(unit_dir: Path = UNIT_DIR, stop: bool = True, out=sys.stdout) -> int:
    names = [f"{u.name}.service" for u in UNITS] + [f"{BACKUP_UNIT}.timer",
                                                      f"{BACKUP_UNIT}.service"]
    present = [n for n in names if (unit_dir / n).exists()]
    if not present:
        print(f"no MASH units in {unit_dir}", file=out)
        return 0
    if unit_dir == UNIT_DIR and os.geteuid() != 0:
        print(f"removing units from {unit_dir} needs root: run `sudo {sys.executable} -m mash "
              "service uninstall`", file=out)
        return 1
    if stop and shutil.which("systemctl"):
        subprocess.run(["systemctl", "disable", "--now", *present], capture_output=True)
    for n in present:
        (unit_dir / n).unlink()
        print(f"removed {unit_dir / n}", file=out)
    if stop and shutil.which("systemctl"):
        subprocess.run(["systemctl", "daemon-reload"], capture_output=True)
    return 0
