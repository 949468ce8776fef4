"""The Huey queue and the worker's tasks: ``huey_consumer mash.tasks.huey`` runs them.

``SqliteHuey`` on its own file in MASH_DATA_DIR; SQLite is the only channel between the reader
and the worker. Retryable cloud failures are re-raised for Huey's ``retries``/``retry_backoff``
(a 429 becomes a ``RetryTask`` after exactly its Retry-After); the jobs themselves are in
``jobs`` and the shared clients in ``runtime``. Starting the consumer starts the runtime
(scheduler, live feed, MQTT) once per process.
"""
from __future__ import annotations

import logging
import sys
import threading
import time

from huey import SqliteHuey
from huey.exceptions import RetryTask, TaskLockedException

from mash.cloud.errors import RetryableError
from mash.config import ConfigError, Settings

# The jobs and the runtime (and with them requests, paho, firebase) load on first use, so a
# process that only enqueues (the reader, `mash sync`) stays small.

log = logging.getLogger("mash.worker")

try:
    settings = Settings.load()
except ConfigError as exc:           # under huey_consumer: one line, exit 2
    print(exc, file=sys.stderr)
    sys.exit(2)

settings.data_dir.mkdir(parents=True, exist_ok=True)
# results=False: nothing reads task results, and each stored result is another write.
huey = SqliteHuey("mash", filename=str(settings.queue_path), results=False, utc=True)

# Created at import so the consumer's flush_locks (python worker.py, huey_consumer -f) knows
# them: a kill -9 mid-task must not leave a lock that blocks the next run. (SqliteHuey has no
# lock TTLs, so -f matters.)
_locks = {name: huey.lock_task(name) for name in
          ("sync_readings", "backup_firebase", "deliver_acks", "deliver_alerts")}

_runtime = None
_runtime_lock = threading.Lock()


def current_runtime():
    """This process's runtime, created on first use from the environment's settings."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            from mash.tasks.runtime import Runtime
            _runtime = Runtime(settings)
        return _runtime


def set_runtime(rt) -> None:
    """Use ``rt`` for the tasks in this process (the sync manager and the tests do)."""
    global _runtime
    with _runtime_lock:
        _runtime = rt


def use_queue_file(path) -> None:
    """Point the queue at another file (the sync manager's in-process consumer)."""
    huey.storage_kwargs["filename"] = str(path)
    huey.storage = huey.create_storage()


@huey.on_startup()
def _start_runtime() -> None:
    from mash.logs import setup_logging
    setup_logging(settings.log_level)    # under a bare huey_consumer too
    current_runtime().start()


@huey.on_shutdown()
def _stop_runtime() -> None:
    with _runtime_lock:
        rt = _runtime
    if rt is not None:
        rt.stop()


def _run(name: str):
    from mash.tasks import jobs
    job = getattr(jobs, name)
    try:
        return job(current_runtime())
    except RetryableError as exc:
        if exc.retry_after:
            log.info("%s waits %.0f s as the backend asked (429)", job.__name__, exc.retry_after)
            raise RetryTask(delay=exc.retry_after) from exc
        raise


@huey.task(retries=4, retry_delay=5, retry_backoff=2, name="sync_readings")
def sync_readings():
    """Drain the backlog to the backend. Never two at once."""
    with _locks["sync_readings"]:
        return _run("sync_readings")


@huey.task(retries=4, retry_delay=5, retry_backoff=2, name="backup_firebase")
def backup_firebase():
    with _locks["backup_firebase"]:
        return _run("backup_firebase")


# Set when a delivery is asked for while one is running in this process: the running sweep
# goes round once more, so nothing waits for the next periodic sweep.
_again = {name: threading.Event() for name in ("deliver_acks", "deliver_alerts")}


def _deliver(name):
    """Deliveries are sweeps: if one is running, it also picks up what this run was asked
    for (it repeats while a pass delivers something or another run was asked for), so skip
    instead of waiting for the lock."""
    lock = _locks[name]
    if lock.is_locked():
        _again[name].set()
        return 0
    with lock:
        total = 0
        for _ in range(20):
            _again[name].clear()
            done = _run(name)
            total += done
            if not done and not _again[name].is_set():
                break
        return total


@huey.task(retries=6, retry_delay=2, retry_backoff=2, name="deliver_acks")
def deliver_acks():
    return _deliver("deliver_acks")


@huey.task(retries=6, retry_delay=2, retry_backoff=2, name="deliver_alerts")
def deliver_alerts():
    return _deliver("deliver_alerts")


@huey.task(name="poll_commands")
def poll_commands():
    return _run("poll_commands")


@huey.task(name="heartbeat")
def heartbeat():
    return _run("heartbeat")


@huey.task(name="force_sync")
def force_sync():
    """``mash sync``: upload, back up and deliver everything now."""
    rt = current_runtime()
    rt.store.meta_set("force_sync_requested", time.time())
    sync_readings()
    backup_firebase()
    deliver_acks()
    deliver_alerts()


def enqueue_sync(rt) -> None:
    """The scheduler's periodic sync: enqueue only when there is something to send."""
    if rt.backend is not None and rt.store.pending_count() and not _locks["sync_readings"].is_locked():
        sync_readings()
    if rt.firebase is not None and rt.store.last_reading_id() > rt.store.sink("firebase").progress \
            and not _locks["backup_firebase"].is_locked():
        backup_firebase()


def cli_sync(wait: bool = False, timeout: float = 3600.0, out=sys.stderr) -> int:
    """``mash sync [--wait]``: enqueue a forced sync; with wait, show the drain's progress."""
    from mash.models import DatabaseManager
    store = DatabaseManager(settings.db_path)
    start_pending = store.pending_count()
    force_sync()
    print(f"sync enqueued ({start_pending} readings pending)", file=out, flush=True)
    if not wait:
        return 0
    t0 = time.monotonic()
    while True:
        pending = store.pending_count()
        done = max(0, start_pending - pending)
        elapsed = time.monotonic() - t0
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = pending / rate if rate > 0 else float("inf")
        frac = done / start_pending if start_pending else 1.0
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        eta_text = f"{eta:.0f} s" if eta != float("inf") else "?"
        print(f"\r[{bar}] {done}/{start_pending}  {rate:.0f} readings/s  ETA {eta_text}   ",
              end="", file=out, flush=True)
        if pending == 0:
            print(f"\nbacklog drained in {elapsed:.1f} s", file=out, flush=True)
            return 0
        if elapsed > timeout:
            print(f"\ngave up after {timeout:.0f} s: {pending} readings still pending "
                  "(is the worker running? see `mash status`)", file=out, flush=True)
            return 1
        time.sleep(0.5)


__all__ = ["huey", "sync_readings", "backup_firebase", "deliver_acks", "deliver_alerts",
           "poll_commands", "heartbeat", "force_sync", "current_runtime", "set_runtime", "TaskLockedException"]
