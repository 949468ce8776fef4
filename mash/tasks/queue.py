"""The Huey queue: how it is built, how the consumer waits and runs, how failures become retries.

The queue holds no durable state: every job is a sweep over ``mash.db`` (readings to sync,
outbox items to deliver), so losing the queue loses nothing. That is why it can live on
RAM-backed storage (``Settings.queue_path``) and cost the SD card nothing.
"""
from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from pathlib import Path

from huey import SqliteHuey
from huey.consumer import Consumer, ConsumerStopped
from huey.exceptions import CancelExecution, RetryTask
from huey.storage import SqliteStorage

from mash.pacing import full_jitter
from mash.sinks.errors import DeviceUnknown, RetryableError
from mash.wakeup import Hints, Listener

log = logging.getLogger("mash.worker")

# Consumer settings (``python worker.py``, the sync manager's in-process consumer).
# The worker threads wait on the queue's wake-up hints (``HintedStorage``: Huey's workers do
# not sleep on a blocking storage), so ``-d 0.01 -b 1.5 -m 0.9`` applies only after an error
# reading the queue; where no socket can be made the storage itself waits 0.9 s between looks.
# Two worker threads, so a long backlog drain never holds up an ack or an alert.
# SIGTERM (systemd's stop) and Ctrl-C let running tasks finish (at most 15 s).
CONSUMER_OPTIONS = dict(workers=2, worker_type="thread", initial_delay=0.01, backoff=1.5,
                        max_delay=0.9, scheduler_interval=1, periodic=False, flush_locks=True,
                        check_worker_health=True, shutdown_timeout=15, graceful_signal="TERM")
CONSUMER_FLAGS = "-w 2 -k thread -d 0.01 -b 1.5 -m 0.9 -f"


QUEUE_LOOK = 30.0    # s: an idle worker thread looks at the queue unhinted this often
STOP_LOOK = 1.0      # s: the consumer's main thread, between health checks, unless signalled


class HintedStorage(SqliteStorage):
    """Huey's SQLite queue that waits for work instead of polling for it, as its Redis
    storage blocks on BRPOP. ``enqueue``, from any process (the worker's scheduler, Huey's
    scheduler moving a retry in, ``mash sync``), sends a wake-up hint to the queue's
    listeners in ``queue-wake/`` beside the queue file; an empty ``dequeue`` waits for one on
    its thread's own listener, ``QUEUE_LOOK`` at most, and returns None. ``wake_all()`` ends
    every wait (the consumer is stopping). Where no listener can be bound it waits ``poll``
    instead, which is what Huey's non-blocking polling would do."""

    blocking = True

    def __init__(self, name="huey", filename="huey.db",
                 poll: float = CONSUMER_OPTIONS["max_delay"], **kwargs):
        super().__init__(name, filename, **kwargs)
        self.wake_dir = Path(filename).parent / "queue-wake"
        self.poll = poll
        self._hints = Hints(self.wake_dir)
        self._local = threading.local()
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()
        self.stopping = threading.Event()

    def enqueue(self, data, priority=None):
        super().enqueue(data, priority)
        self._hints.notify()

    def dequeue(self):
        # the socket first: an enqueue after our look then finds it and wakes the wait
        listener = None if self.stopping.is_set() else self._listener()
        data = super().dequeue()
        if data is None and not self.stopping.is_set():     # again: wake_all may have run
            if listener is None:
                self.stopping.wait(self.poll)
            else:
                listener.wait(QUEUE_LOOK)
        return data

    def _listener(self) -> Listener | None:
        if not hasattr(self._local, "listener"):
            try:
                self._local.listener = Listener(self.wake_dir)
            except OSError as exc:
                log.info("queue wake-up hints off (%s): polling the queue instead", exc)
                self._local.listener = None
            else:
                with self._lock:
                    self._listeners.append(self._local.listener)
        return self._local.listener

    def wake_all(self) -> None:
        """End every worker thread's wait now, and any later one until ``rest()``; a hint
        too, for the consumer's worker processes where it runs them (``-k process``)."""
        self.stopping.set()
        with self._lock:
            for listener in self._listeners:
                listener.interrupt()
        self._hints.notify()

    def rest(self) -> None:
        """A new consumer: empty dequeues wait again; the sockets of threads gone are closed."""
        with self._lock:
            for listener in self._listeners:
                listener.close()
            self._listeners.clear()
        self._local = threading.local()
        self.stopping.clear()


class IdleConsumer(Consumer):
    """Huey's consumer with a main thread that sleeps: Huey's own looks for a stop signal ten
    times a second (the idle worker's largest cost). This one waits on a self-pipe its signal
    handler writes to, so a stop is as prompt, and runs Huey's loop (health check, stop) after it
    or every ``STOP_LOOK``. ``stop()`` ends the worker threads' waits on the queue first."""

    def __init__(self, huey, **options):
        super().__init__(huey, **options)
        # a self-pipe, not an Event: a signal handler must not take a lock the main thread
        # may hold at that instant (Event.set would, and hang the stop)
        self._signal_r, self._signal_w = os.pipe()
        os.set_blocking(self._signal_r, False)
        os.set_blocking(self._signal_w, False)
        self._stop_flag_timeout = 0          # Huey's loop looks at the flag without waiting
        huey.storage.rest()                  # a new consumer's threads wait again

    def _handle_signal(self, signum, frame):
        super()._handle_signal(signum, frame)
        with contextlib.suppress(OSError):   # full: a wake is waiting already
            os.write(self._signal_w, b"!")

    def loop(self, health_check_ts=None):
        try:
            if select.select([self._signal_r], [], [], STOP_LOOK)[0]:
                with contextlib.suppress(OSError):
                    os.read(self._signal_r, 64)
        except KeyboardInterrupt:            # a second Ctrl-C during the wait: as Huey does
            self._logger.info("Received SIGINT")
            self.stop(graceful=True)
            raise ConsumerStopped from None
        return super().loop(health_check_ts)

    def stop(self, graceful=False):
        self.stop_flag.set()
        self.huey.storage.wake_all()
        super().stop(graceful=graceful)


class GatewayHuey(SqliteHuey):
    """The gateway's queue: Huey's SQLite one, woken by hints (``HintedStorage``) and run by
    ``IdleConsumer``, whether started by ``worker.py``, ``huey_consumer`` or the sync manager."""

    storage_class = HintedStorage

    def create_consumer(self, **options):
        return IdleConsumer(self, **options)


def make_huey(path) -> GatewayHuey:
    """The queue on ``path``. results=False: nothing reads task results, and each stored
    result would be another write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return GatewayHuey("mash", filename=str(path), results=False, utc=True)


def retry_wait(task) -> float | None:
    """The wait before ``task``'s next retry: full jitter (tenacity) over its own
    ``retry_delay`` doubling per attempt, so a fleet that failed together does not retry
    together. None when it has no retry left or no delay (Huey's own rule then)."""
    base = task.default_retry_delay
    if not task.retries or not base:
        return None
    return full_jitter(task.default_retries - task.retries + 1, base, base * 2 ** task.default_retries)


def run_job(job, ctx, task=None):
    """Run ``job(ctx)``, turning an expected cloud failure into a Huey retry.

    An error that says when to try again (``retry_after``: a 429's Retry-After, the backend
    client's login backoff after our credentials were refused) retries exactly then, for as
    long as it takes: the work stays owed, and the backoff, not a retry count, keeps it from
    hammering. Any other RetryableError uses the task's own ``retries``, each retry after a
    full-jitter draw over its ``retry_delay`` doubled per attempt (``retry_wait``). Neither
    prints a traceback: the clients and jobs log one line per state change (offline, online, credentials refused), and the traceback is there at
    DEBUG."""
    try:
        return job(ctx)
    except DeviceUnknown as exc:
        # the backend lacks our device: recorded and logged once (``sync.ensure_registered``),
        # asked again when due by the job's own next run, never a queued retry that would
        # outlive a restart and hold the job back after the device exists
        log.debug("%s skipped: %s", job.__name__, exc)
        return None
    except RetryableError as exc:
        log.debug("%s will be retried: %s", job.__name__, exc, exc_info=True)
        if exc.retry_after:
            raise RetryTask(delay=exc.retry_after) from exc
        wait = retry_wait(task) if task is not None else None
        if wait is not None:
            task.retry_delay = wait          # Huey schedules the retry after this
        raise CancelExecution(retry=None) from exc
