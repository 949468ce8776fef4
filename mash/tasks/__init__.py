"""The Huey queue and the worker's tasks: ``huey_consumer mash.tasks.huey`` runs them.

By concern:
- ``queue``: builds the Huey queue (woken by hints), the consumer settings, failures -> retries;
- ``context``: the store and the cloud clients the tasks share in one process;
- ``sync``: readings to the backend (drain) and to Firebase (backup);
- ``delivery``: alerts and command outcomes from the outbox to both sinks;
- ``intake``: commands in from the backend poll and MQTT; ``status``: the heartbeat;
- ``remote_config``: the configuration pulled from the backend and Firebase;
- ``schedule``: the second-resolution scheduler; ``live``: the live MQTT feed;
- ``service``: those threads started and stopped together; ``manager``: the guide's
  sync manager over all of this.

Importing this module reads only where the queue lives (``MASH_DATA_DIR``,
``MASH_QUEUE_DIR``); the settings are read when the worker starts, so a bad one is reported
by the worker (one line, exit code 2), not by whoever imported the module.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path

from huey.signals import SIGNAL_COMPLETE, SIGNAL_ERROR, SIGNAL_EXECUTING, SIGNAL_RETRYING

from mash import sdnotify
from mash.config import ConfigError, Settings, environment, queue_path_from
from mash.logs import setup_logging
from mash.tasks import delivery, firebase_apps, intake, remote_config, status, sync
from mash.tasks.context import WorkerContext
from mash.tasks.queue import make_huey, run_job
from mash.tasks.schedule import Periodic
from mash.tasks.service import WorkerService

log = logging.getLogger("mash.worker")

huey = make_huey(queue_path_from(environment()))

_context: WorkerContext | None = None
_service: WorkerService | None = None
_lifecycle = threading.RLock()
_locks_flushed = False


def current_context() -> WorkerContext:
    """This process's context, built from the environment's settings on first use."""
    global _context
    with _lifecycle:
        if _context is None:
            _context = WorkerContext(Settings.load())
        return _context


def set_context(ctx: WorkerContext | None) -> None:
    """Use ``ctx`` for the tasks in this process (the sync manager and the tests do)."""
    global _context
    with _lifecycle:
        _context = ctx


def use_queue_file(path) -> None:
    """Point the queue at another file (a sync manager whose settings name another one)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    huey.storage_kwargs["filename"] = str(path)
    huey.storage = huey.create_storage()


def _job(fn, lock: bool = True, **retry):
    """A Huey task (named as ``fn``) that runs ``fn(context)`` under its own task lock, with
    cloud failures turned into retries."""
    task_lock = huey.lock_task(fn.__name__) if lock else None

    def run(task=None):
        ctx = current_context()
        if task_lock is None:
            return run_job(fn, ctx, task)
        with task_lock:
            return run_job(fn, ctx, task)
    run.__name__, run.__doc__ = fn.__name__, fn.__doc__
    return huey.task(name=fn.__name__, context=True, **retry)(run)


sync_readings = _job(sync.sync_readings, retries=4, retry_delay=5, retry_backoff=2)
backup_firebase = _job(sync.backup_firebase, retries=4, retry_delay=5, retry_backoff=2)
backup_aggregates = _job(firebase_apps.backup_aggregates, retries=4, retry_delay=5, retry_backoff=2)
poll_commands = _job(intake.poll_commands)        # its next interval is its retry
heartbeat = _job(status.heartbeat)
pull_configuration = _job(remote_config.pull_configuration, retries=3, retry_delay=10,
                          retry_backoff=2)

_deliver_lock = huey.lock_task("deliver")


def _deliver(ctx) -> int:
    return delivery.sweep(ctx, _deliver_lock)


deliver = huey.task(name="deliver", retries=6, retry_delay=2, retry_backoff=2, context=True)(
    lambda task=None: run_job(_deliver, current_context(), task))


@huey.task(name="force_sync")
def force_sync():
    """``mash sync``: upload, back up and deliver everything now."""
    sync_readings()
    backup_firebase()
    backup_aggregates()
    deliver()


def busy(name: str, running: bool = True) -> bool:
    """Is a run of ``name`` queued, waiting for a retry, or (with ``running``) running?
    (Reads the queue.)"""
    if running and huey.is_locked(name):
        return True
    return any(t.name == name for t in huey.pending()) or \
        any(t.name == name for t in huey.scheduled())


def periodic_jobs() -> list[Periodic]:
    return [
        Periodic("sync", sync_readings, due=sync.sync_due),
        Periodic("backup_firebase", backup_firebase, due=sync.backup_due, interval="sync"),
        Periodic("backup_aggregates", backup_aggregates, due=firebase_apps.aggregates_due,
                 interval="sync"),
        Periodic("poll", poll_commands, due=lambda ctx: ctx.backend is not None),
        Periodic("heartbeat", heartbeat),
        Periodic("pull_configuration", pull_configuration, interval="config",
                 due=lambda ctx: ctx.backend is not None or ctx.firebase is not None),
        # owed to a sink that is configured (and reachable: MQTT's reconnect wakes it)
        Periodic("deliver", deliver, due=delivery.due),
        # another process committed: deliver now what should not wait for the sweep
        Periodic("deliver_now", deliver, interval="deliver",
                 due=lambda ctx: delivery.due(ctx, urgent_only=True)),
    ]


_TASK_NAMES = {"sync": "sync_readings", "poll": "poll_commands", "deliver_now": "deliver"}


def _busy_job(job_name: str) -> bool:
    # A delivery asked for while one runs is still enqueued: it finds the sweep's lock taken
    # and makes the running sweep go round again.
    return busy(_TASK_NAMES.get(job_name, job_name), running=not job_name.startswith("deliver"))


CONSUMER_STALL = 300.0      # s with tasks waiting and none started or finished: hung
_last_task = time.monotonic()


@huey.signal(SIGNAL_EXECUTING, SIGNAL_COMPLETE, SIGNAL_ERROR, SIGNAL_RETRYING)
def _task_activity(signal, task, *args) -> None:
    global _last_task
    _last_task = time.monotonic()


def consumer_alive() -> bool:
    """The consumer still runs tasks: nothing is waiting for it, or it started or finished
    one within CONSUMER_STALL (a long drain runs on one thread while the other takes the
    rest). Reads the queue (in RAM)."""
    return time.monotonic() - _last_task < CONSUMER_STALL or huey.pending_count() == 0


def start_service(ctx: WorkerContext, live_feed: bool = True) -> WorkerService:
    return WorkerService(ctx, periodic_jobs(), _busy_job, live_feed=live_feed,
                         consumer_alive=consumer_alive).start()


@huey.on_startup()
def _worker_started() -> None:
    """Runs in each consumer thread: once per process, flush the task locks a power cut or
    ``kill -9`` left behind (so a bare ``huey_consumer mash.tasks.huey`` recovers too) and,
    in a worker process, build the context and start the service, then tell systemd it is
    up. Huey only logs an exception from this hook and runs on, scheduling nothing: a
    start-up that fails (the store cannot be opened, a client cannot be built) ends the
    process here instead, with one line and exit code 1 (2 for a bad setting)."""
    global _locks_flushed, _service, _context
    with _lifecycle:
        if _locks_flushed:
            return
        _locks_flushed = True
        try:
            flushed = huey.flush_locks()
            if flushed:
                log.warning("cleared task locks left by an unclean stop: %s",
                            ", ".join(sorted(flushed)))
            if _context is not None:          # the sync manager brought its own context
                return
            try:
                settings = Settings.load()
            except ConfigError as exc:        # a bare huey_consumer: one line, exit code 2
                print(exc, file=sys.stderr, flush=True)
                os._exit(2)
            setup_logging(settings.log_level)
            _context = WorkerContext(settings)
            _service = start_service(_context)
            intake.resume_interrupted_update(_context)
        except Exception as exc:
            log.debug("worker start-up failed", exc_info=True)
            if logging.getLogger().handlers:
                log.critical("worker cannot start: %s: %s", type(exc).__name__, exc)
            else:                             # before logging is set up
                print(f"worker cannot start: {type(exc).__name__}: {exc}", file=sys.stderr,
                      flush=True)
            logging.shutdown()
            os._exit(1)
        sdnotify.ready()


@huey.on_shutdown()
def _worker_stopping() -> None:
    global _service
    with _lifecycle:
        service, _service = _service, None
    if service is not None:
        sdnotify.stopping()
        service.stop()


__all__ = ["huey", "sync_readings", "backup_firebase", "poll_commands", "heartbeat", "deliver",
           "pull_configuration",
           "force_sync", "current_context", "set_context", "start_service", "busy"]
