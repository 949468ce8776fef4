"""``mash run``: the reader, the worker and the dashboard as child processes in the
foreground.

With no Arduino attached (and no ``SERIAL_PORT``) it starts the simulated board on a
pseudo-terminal and points the reader at it. Ctrl-C or SIGTERM stops every child cleanly
(SIGTERM, then SIGKILL after 15 s); if the reader or the worker dies, the rest are stopped
too. The dashboard is not essential: if it cannot start (its port taken, say), it says why
and the gateway goes on without it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from mash.config import Settings
from mash.reader import find_board
from mash.chamber import Chamber
from mash.simulator import SimulatedBoard

SERVICES = (["-m", "mash.reader"], ["-m", "mash.worker"])
DASHBOARD = ["-m", "mash.dashboard"]


def run(settings: Settings, interval: float = 5.0, out=sys.stdout) -> int:
    env = dict(os.environ)
    board = None
    if settings.serial_port == "sim" or (settings.serial_port is None and not find_board()):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        board = SimulatedBoard(interval=interval, link=settings.data_dir.resolve() / "sim-tty",
                               chamber=Chamber()).start()
        env["SERIAL_PORT"] = board.port
        print(f"no Arduino attached: simulated board on {board.port}, a reading every "
              f"{interval:g} s", file=out, flush=True)
    procs = [subprocess.Popen([sys.executable, *args], env=env) for args in SERVICES]
    extra = [subprocess.Popen([sys.executable, *DASHBOARD], env=env)]
    print(f"gateway running (data in {settings.data_dir}); dashboard at "
          f"http://{settings.dashboard_host}:{settings.dashboard_port}; Ctrl-C stops it",
          file=out, flush=True)
    stopping = []
    previous = {s: signal.signal(s, lambda *_: stopping.append(1))
                for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stopping and all(p.poll() is None for p in procs):
            time.sleep(0.2)
    finally:
        for p in procs + extra:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for p in procs + extra:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if board:
            board.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    codes = [p.returncode for p in procs]
    return 0 if stopping else max(abs(c) for c in codes if c is not None)
