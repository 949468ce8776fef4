"""A fleet's backend side in one process: ``python bench/fleet_backend.py FIRST COUNT TOTAL SPREAD T0 DIR``.

Starts COUNT gateways, device ids ``fleet-FIRST`` ... , each the worker's own backend half and
nothing else (no serial side, no MQTT, no Firebase): its ``WorkerContext`` with a
``BackendAPIClient`` (its pacer, login backoff, Retry-After), its store (a real ``Store`` on
DIR, which the bench puts in /dev/shm: RAM, so a write costs nothing), its
``IntervalScheduler`` over the jobs of ``mash.tasks.periodic_jobs()`` (first runs phased by
the serial), and the jobs run as the consumer runs them: Huey's own ``Worker`` (two threads,
``CONSUMER_OPTIONS``) and ``Scheduler`` (the retries) over an in-memory Huey per gateway that
waits for work as the worker's queue does (``WaitingMemoryStorage``), each
task with the shipped task's retry settings and ``run_job``'s retry rules. Gateway k of the
fleet (of TOTAL) boots at T0 + k / TOTAL * SPREAD (unix time), and from then on its store
gets a reading line every 5 s, as from the board.

The backend settings come from the environment (``BACKEND_URL``, ...); every request carries
``X-Replica-Client: <device id>``, so the replica of the deployed backend counts each gateway
as the client it is in production (its own farm's IP), not the whole fleet as 127.0.0.1.

Commands on stdin, one a line: ``mark`` (the backend is back: note each store's newest
reading), ``still`` (stop adding readings); end of input stops. Prints, flushed:
``ready <unix time>`` once every gateway has booted, then every 2 s
``pending <readings not on the backend, -1 until "still"> <gateways with every reading up to
the mark on it> <unix time>``, and at the end ``stats <json>``.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import requests  # noqa: E402
from huey import MemoryHuey  # noqa: E402
from huey.storage import MemoryStorage  # noqa: E402
from huey.consumer import Scheduler, Worker  # noqa: E402

import mash.tasks as shipped  # noqa: E402
from mash.config import Settings  # noqa: E402
from mash.models import Store  # noqa: E402
from mash.models.schema import SYNCED  # noqa: E402
from mash.sinks.backend_api import BackendAPIClient  # noqa: E402
from mash.tasks import delivery, firebase_apps, intake, remote_config, status, sync  # noqa: E402
from mash.tasks.context import WorkerContext  # noqa: E402
from mash.tasks.queue import CONSUMER_OPTIONS, run_job  # noqa: E402
from mash.tasks.schedule import IntervalScheduler, Periodic  # noqa: E402

# the shipped tasks' functions, by task name (mash/tasks/__init__.py); "deliver" is below
JOBS = {"sync_readings": sync.sync_readings, "backup_firebase": sync.backup_firebase,
        "backup_aggregates": firebase_apps.backup_aggregates,
        "poll_commands": intake.poll_commands, "heartbeat": status.heartbeat,
        "pull_configuration": remote_config.pull_configuration}
LINE = {"fruiting": {"temp": 24.0, "humidity": 85.0, "co2": 800},
        "spawning": {"temp": 28.0, "humidity": 70.0, "co2": 900}}
EVERY = 5.0          # s between reading lines, as the board sends them

_out = threading.Lock()


class WaitingMemoryStorage(MemoryStorage):
    """As the worker's queue (``mash.tasks.queue.HintedStorage``), in memory: an empty
    dequeue waits for an enqueue instead of polling (a condition here, a socket's hint
    there), so a thousand gateways' idle worker threads cost nothing, as on a farm."""

    blocking = True
    LOOK = 30.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._ready = threading.Condition()

    def enqueue(self, data, priority=None):
        with self._ready:
            super().enqueue(data, priority)
            self._ready.notify_all()

    def dequeue(self):
        with self._ready:
            data = super().dequeue()
            if data is None:
                self._ready.wait(self.LOOK)
            return data


class FleetHuey(MemoryHuey):
    storage_class = WaitingMemoryStorage


def say(*words) -> None:
    with _out:
        sys.stdout.write(" ".join(str(w) for w in words) + "\n")
        sys.stdout.flush()


class Gateway:
    """One gateway's worker, backend side only."""

    def __init__(self, device: str, directory: Path):
        self.device = device
        settings = Settings.from_mapping({**os.environ, "DEVICE_ID": device,
                                          "MASH_DATA_DIR": str(directory / device)})
        session = requests.Session()
        session.headers["X-Replica-Client"] = device       # read by the replica only
        self.ctx = WorkerContext(settings, store=Store(settings.db_path),
                                 backend=BackendAPIClient(settings, session=session),
                                 mqtt=None, firebase=None)
        self.huey = FleetHuey(device, results=False, utc=True)
        self.tasks = {name: self._task(name, fn) for name, fn in JOBS.items()}
        deliver_lock = self.huey.lock_task("deliver")

        def deliver(ctx):
            return delivery.sweep(ctx, deliver_lock)
        self.tasks["deliver"] = self._task("deliver", deliver, lock=False)
        self.jobs = [Periodic(p.name, self.tasks[p.enqueue.name], p.due, p.interval)
                     for p in shipped.periodic_jobs()]
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.scheduler = None
        self.mark = None

    def _task(self, name: str, fn, lock: bool = True):
        """As ``mash.tasks._job``: ``fn(ctx)`` under its task lock, the shipped task's retries."""
        s = getattr(shipped, name).settings
        task_lock = self.huey.lock_task(name) if lock else None
        ctx = self.ctx

        def run(task=None):
            if task_lock is None:
                return run_job(fn, ctx, task)
            with task_lock:
                return run_job(fn, ctx, task)
        run.__name__ = name
        return self.huey.task(name=name, context=True, retries=s["default_retries"],
                              retry_delay=s["default_retry_delay"],
                              retry_backoff=s["default_retry_backoff"])(run)

    def busy(self, job: str) -> bool:
        """As ``mash.tasks._busy_job`` over this gateway's queue."""
        name = shipped._TASK_NAMES.get(job, job)
        return (not job.startswith("deliver") and self.huey.is_locked(name)) or \
            any(t.name == name for t in self.huey.pending()) or \
            any(t.name == name for t in self.huey.scheduled())

    def start(self) -> None:
        o = CONSUMER_OPTIONS
        parts = [Worker(self.huey, self.stop, o["initial_delay"], o["max_delay"], o["backoff"])
                 for _ in range(o["workers"])]
        parts.append(Scheduler(self.huey, self.stop, o["scheduler_interval"], periodic=False))
        for part in parts:
            t = threading.Thread(target=self._loop, args=(part,), daemon=True,
                                 name=f"{self.device}-{part.process_name}")
            t.start()
            self.threads.append(t)
        self.ctx.store.beat("worker", self.ctx.intervals["heartbeat"])
        self.scheduler = IntervalScheduler(self.ctx, self.jobs, self.busy)
        # as in the worker, where the store's hints feed it (``HintRelay``): it sleeps until
        # the next job is due instead of looking twice a second
        self.scheduler.hinted = True
        self.scheduler.start()

    def _loop(self, part) -> None:
        while not self.stop.is_set():      # as Huey's consumer runs each of its processes
            part.loop()


def main() -> int:
    first, count, total = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    spread, t0, directory = float(sys.argv[4]), float(sys.argv[5]), Path(sys.argv[6])
    logging.basicConfig(level=logging.ERROR, format="%(asctime)s %(name)s: %(message)s")
    gateways = [Gateway(f"fleet-{n:04d}", directory) for n in range(first, first + count)]
    booted: list[Gateway] = []
    feeding = threading.Event()
    feeding.set()
    still_at = [0.0]
    done = threading.Event()

    def feed():
        """A line per EVERY s per booted gateway, the gateways' lines spread over EVERY."""
        k = 0
        start = time.monotonic()
        while not done.is_set():
            for i, gw in enumerate(list(booted)):
                at = start + k * EVERY + i * EVERY / max(1, len(gateways))
                if done.wait(max(0.0, at - time.monotonic())):
                    return
                if feeding.is_set():
                    gw.ctx.store.save_sensor_data(dict(LINE))
            k += 1
            rest = start + k * EVERY - time.monotonic()
            if rest > 0 and done.wait(rest):
                return

    def monitor():
        """Counts only what the bench is waiting for, and each gateway only until it is done:
        counting every store every 2 s would cost the fleet's processes more than the gateways
        themselves do (a drained gateway stays drained; with no new readings, a gateway with
        nothing pending stays so)."""
        drained: set[str] = set()
        settled: set[str] = set()
        while not done.wait(2.0):
            pending = 0
            for gw in list(booted):
                if gw.mark is not None and gw.device not in drained and \
                        gw.ctx.store.backend_progress() >= gw.mark:
                    drained.add(gw.device)
                if not feeding.is_set() and gw.device not in settled:
                    owed = gw.ctx.store.pending_count()
                    pending += owed
                    if not owed and time.monotonic() > still_at[0] + EVERY:
                        settled.add(gw.device)      # past any line the feed had begun
            say("pending", pending if not feeding.is_set() else -1, len(drained),
                f"{time.time():.3f}")

    def commands():
        for line in sys.stdin:
            word = line.strip()
            if word == "mark":
                for gw in booted:
                    gw.mark = gw.ctx.store.last_reading_id()
            elif word == "still":
                still_at[0] = time.monotonic()
                feeding.clear()
        done.set()

    threading.Thread(target=feed, daemon=True, name="feed").start()
    threading.Thread(target=monitor, daemon=True, name="monitor").start()
    reader = threading.Thread(target=commands, daemon=True, name="stdin")
    reader.start()
    for n, gw in zip(range(first, first + count), gateways):
        delay = t0 + n / total * spread - time.time()
        if delay > 0 and done.wait(delay):
            break
        gw.start()
        booted.append(gw)
    say("ready", f"{time.time():.3f}")
    done.wait()
    stats = {"gateways": len(booted), "stored": 0, "synced": 0, "resent_unanswered": 0,
             "granted": 0, "paced_wait_s": 0.0}
    for gw in booted:
        gw.stop.set()
        gw.scheduler._stop.set()
    for gw in booted:
        store, pacer = gw.ctx.store, gw.ctx.backend.pacer
        S = store.m.SensorData
        stats["stored"] += S.select().count()
        stats["synced"] += S.select().where(S.synced == SYNCED).count()
        stats["resent_unanswered"] += store.counters().get("sync_resent_unanswered", 0)
        stats["granted"] += pacer.granted
        stats["paced_wait_s"] += pacer.waited
    say("stats", json.dumps(stats))
    os._exit(0)          # the gateways' threads are daemons with nothing left to finish


if __name__ == "__main__":
    sys.exit(main())
