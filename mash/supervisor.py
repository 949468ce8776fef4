"""``mash run``: the reader, the worker and the dashboard as child processes in the
foreground.

With no Arduino attached (and no ``SERIAL_PORT``) it starts the simulated board on a
pseudo-terminal and points the reader at it, marked as simulated (``MASH_SIMULATED_BOARD``)
so its readings stay local. With a sink configured it refuses to (exit 2) unless
``SERIAL_PORT=sim`` asks for the simulated board: an unplugged Arduino must not look like a
farm sending fake readings under its real DEVICE_ID. Ctrl-C or SIGTERM stops every child cleanly
(SIGTERM, then SIGKILL after 15 s). A reader or worker that exits is started again
``RESTART_SEC`` later, as the units' ``Restart=always`` does, so an update's health window
judges ``mash run`` and systemd alike (a restart shows as a new pid in the heartbeat). SIGHUP
restarts every child (``mash update``, a ``RESTART`` command). Children start from
``<home>/current/bin/python`` when the home is laid out as releases (``mash.releases``), so a
restart runs whatever ``current`` points at. The dashboard is not essential: if it cannot
start (its port taken, say), it says why and the gateway goes on without it. The
supervisor's pid is in ``<data>/mash-run.pid`` while it runs.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from mash import releases
from mash.config import Settings, home
from mash.reader import find_board
from mash.chamber import Chamber
from mash.simulator import SimulatedBoard

SERVICES = (["-m", "mash.reader"], ["-m", "mash.worker"])
DASHBOARD = ["-m", "mash.dashboard"]
RESTART_SEC = 2.0
PID_FILE = "mash-run.pid"


def pid_file(settings: Settings):
    return settings.data_dir / PID_FILE


def _start(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([releases.python(home()), *args], env=env)


def _stop(procs) -> None:
    """SIGTERM each child, SIGKILL whatever has not stopped 15 s later."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def configured_sinks(settings: Settings) -> list[str]:
    return [name for name, on in (("the backend", settings.backend_enabled),
                                  ("MQTT", settings.mqtt_enabled),
                                  ("Firebase", settings.firebase_enabled)) if on]


def run(settings: Settings, interval: float = 5.0, out=sys.stdout, err=sys.stderr) -> int:
    os.umask(0o077)             # the data directory it may make is private, like the store
    env = dict(os.environ)
    if releases.laid_out(home()):
        # never the current directory first on sys.path: in a checkout it would shadow the
        # release's installed package with the checkout's (python -P)
        env["PYTHONSAFEPATH"] = "1"
    board = None
    wanted = settings.serial_port == "sim"
    missing = settings.serial_port is None and not find_board()
    if missing:
        sinks = configured_sinks(settings)
        if sinks:
            print(f"mash run: no Arduino attached and {', '.join(sinks)} configured: not "
                  "starting the simulated board, whose readings would go out as DEVICE_ID="
                  f"{settings.device_id}; plug the board in, set SERIAL_PORT to its device, or "
                  "SERIAL_PORT=sim (its readings stay local unless SIM_SYNC=1)",
                  file=err, flush=True)
            return 2
    if wanted or missing:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        board = SimulatedBoard(interval=interval, link=settings.data_dir.resolve() / "sim-tty",
                               chamber=Chamber()).start()
        env["SERIAL_PORT"] = board.port
        env["MASH_SIMULATED_BOARD"] = "1"
        kept = "sent to the sinks (SIM_SYNC=1)" if settings.sim_sync else "kept local"
        print(f"{'simulated board' if wanted else 'no Arduino attached: simulated board'} on "
              f"{board.port}, a reading every {interval:g} s, its readings {kept}",
              file=out, flush=True)
    procs = [_start(args, env) for args in SERVICES]
    extra = [_start(DASHBOARD, env)]
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    pid_file(settings).write_text(f"{os.getpid()}\n")
    print(f"gateway running (data in {settings.data_dir}); dashboard at "
          f"http://{settings.dashboard_host}:{settings.dashboard_port}; Ctrl-C stops it",
          file=out, flush=True)
    stopping, restart = [], []
    previous = {s: signal.signal(s, lambda *_: stopping.append(1))
                for s in (signal.SIGTERM, signal.SIGINT)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda *_: restart.append(1))
    due: dict[int, float] = {}          # index of a child that exited -> when it starts again
    try:
        while not stopping:
            if restart:
                restart.clear()
                print("restarting the services (SIGHUP)", file=out, flush=True)
                _stop(procs + extra)
                procs = [_start(args, env) for args in SERVICES]
                extra = [_start(DASHBOARD, env)]
                due.clear()
            for i, p in enumerate(procs):
                if p.poll() is not None and i not in due:
                    print(f"{SERVICES[i][-1]} exited ({p.returncode}): starting it again in "
                          f"{RESTART_SEC:g} s", file=err, flush=True)
                    due[i] = time.monotonic() + RESTART_SEC
            for i, at in list(due.items()):
                if time.monotonic() >= at:
                    procs[i] = _start(SERVICES[i], env)
                    del due[i]
            time.sleep(0.2)
    finally:
        _stop(procs + extra)
        if board:
            board.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
        try:
            pid_file(settings).unlink()
        except OSError:
            pass
    return 0
