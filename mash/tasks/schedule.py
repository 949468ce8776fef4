"""The worker's clock: periodic jobs on second-resolution intervals, enqueued on Huey.

Why not Huey's ``crontab``: its resolution is a minute, and the gateway needs a 10 s command
poll and ``SYNC_INTERVAL`` / ``CONFIGURE`` intervals in seconds that change at run time. So
one small thread keeps the intervals and enqueues each job when it is due, has work, and is
neither queued, running nor waiting for a retry (a backlog during an outage gets one retry
chain, not a new run every interval). The queue lives in RAM, so an enqueue costs the SD
card nothing, and Huey runs, retries and shows every job.

A fleet must not run in lockstep: a thousand gateways started by one power cut's return would
otherwise sync, poll and pull their configuration at the same seconds. So the jobs in
``PHASED`` first run after ``phase(serial, job, interval)``: a stable part of their interval
derived from the device's serial, spreading the fleet evenly over it. Each later run follows
the one before by the interval, so the phase holds. Deliveries start at once; the heartbeat
runs 2 s after start (ONLINE soon after a boot), then at its phase.

It also watches SQLite's ``data_version`` (a read, no write): when another connection
commits and a sink is owed something (the reader's alert or command outcome), delivery is
enqueued at once. With the store's wake-up hints (``HintRelay``) it sleeps until the next job
is due or a hint comes; without them it looks every ``TICK``.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Callable

from mash.tasks.loop import BackgroundLoop

log = logging.getLogger("mash.worker")

TICK = 0.5      # s: without wake-up hints, a delivery waits at most this long for its enqueue
LONGEST_SLEEP = 10.0    # s: with them, the longest sleep (the watchdog's ping, a lost hint)
PHASED = ("sync", "backup_firebase", "backup_aggregates", "poll", "pull_configuration")


def phase(serial: str, job: str, interval: float) -> float:
    """Seconds in ``[0, interval)`` this device waits before ``job``'s first run: the same on
    every start of the same device, and uniform across devices (a hash of serial and job)."""
    digest = hashlib.sha256(f"{serial}/{job}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 * interval


@dataclass
class Periodic:
    name: str                                  # also the interval's key in ctx.intervals
    enqueue: Callable[[], object]
    due: Callable[[object], bool] | None = None   # fn(ctx): is there work? (a read)
    interval: str | None = None                # interval key when not ``name``


class IntervalScheduler(BackgroundLoop):
    thread_name = "scheduler"

    def __init__(self, ctx, jobs: list[Periodic], busy: Callable[[str], bool], on_tick=None,
                 ping_every: float | None = None):
        super().__init__()
        self.ctx, self.jobs, self.busy = ctx, jobs, busy
        self.on_tick = on_tick or (lambda: None)     # each tick: the systemd watchdog's ping
        # the longest sleep: the watchdog's ping must not wait for the next due job
        self.longest = min(LONGEST_SLEEP, ping_every or LONGEST_SLEEP)
        self.changed = ctx.wakeup         # ctx.wake() and the store's hints (HintRelay) set it
        now = time.monotonic()
        serial = ctx.settings.device_id
        self._next = {job.name: now + (phase(serial, job.name, ctx.intervals[job.interval or job.name])
                                       if job.name in PHASED else 0.0) for job in jobs}
        self._next["heartbeat"] = now + 2.0      # after MQTT has had a chance to connect
        # ... and its second run at its phase, so a fleet booted by one power cut's return
        # says ONLINE at once but beats at its own second of the minute from then on
        self._first_gap = {"heartbeat": phase(serial, "heartbeat", ctx.intervals["heartbeat"])}

    def run_loop(self) -> None:
        version = None
        while not self._stop.is_set():
            woken, self.ctx.woken = self.ctx.woken, set()
            try:
                v = self.ctx.store.data_version()
                if v != version:
                    version = v
                    woken.add("deliver_now")      # cheap to check: its due() reads
                self.step(time.monotonic(), woken)
            except Exception:
                log.exception("scheduler step failed")
            self.on_tick()
            self.pause(TICK, self.sleep_for(time.monotonic()))

    def sleep_for(self, now: float) -> float:
        """Until the next job is due (with hints on, nothing else needs a look before)."""
        soonest = min((self._next.get(job.name, 0.0) for job in self.jobs), default=now)
        return min(self.longest, max(0.01, soonest - now))

    def step(self, now: float, woken: set[str]) -> list[str]:
        """Enqueue every job that is due; returns their names."""
        enqueued = []
        for job in self.jobs:
            if now < self._next.get(job.name, 0.0) and job.name not in woken:
                continue
            if now >= self._next.get(job.name, 0.0):
                gap = self._first_gap.pop(job.name, None)
                self._next[job.name] = now + (gap if gap is not None
                                              else self.ctx.intervals[job.interval or job.name])
            if job.due is not None and not job.due(self.ctx):
                continue
            if self.busy(job.name):
                continue
            job.enqueue()
            enqueued.append(job.name)
        return enqueued
